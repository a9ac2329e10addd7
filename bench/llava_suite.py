"""LLaVA-1.5-7B's shapes (random weights): CRAM's training step, generation and the data path, each against its
reference side by side in one process (targets: step <= 1.10x LoRA's at the same active rank, generation <= 1.05x
LoRA's time, data path <= 1.05x the step on pre-made tensors; one adapted linear alone is adapter_layer.py).

    python -m bench llava_suite --json out.json         # a GPU, bf16 (CLIP ViT-L/14-336 + a 7B Llama)
    python -m bench llava_suite --tiny                  # a CPU smoke run of the same code, tiny widths

step      CRAM's stable phase, built from the library's own parts: a task joining a group that holds 3 frozen
          experts of ranks 4-9 (another group's 4 experts exist and do not run), the new rank-8 expert and
          its per-layer centroids training, per-sample weights from ``group_layer_weights`` (sigma in gap
          units), the gated orthogonality penalty on all 128 adapted modules (image-token-pooled inputs), batched
          over modules as CramMethod runs it on a GPU.
          Against ``lora``: one LoRA of the same active rank (the group's ranks summed) on the same 128
          modules, and ``peft``: the same LoRA through PEFT (what a user would otherwise run), when installed.
          With gradient checkpointing at batch 8, and without at batch 4. Sequence 576 image + 128 text.
          CRAM twice: ``cram_split`` (the trainable expert in its own matmul chain beside the frozen experts'
          chain) and ``cram_fused`` (its factors appended to the frozen chain: one pass over the activations;
          the library's default off the CPU).
generate  greedy decoding of 32 new tokens for a batch of 8 prompts from two groups (per-sample routing
          over both groups' experts) against the LoRA; tokens/s; ``--blocks`` alternating blocks of
          ``--gen-repeats`` calls per variant, medians; and the operators one call dispatches (kernel launches
          on a GPU: what a host-bound decoding step costs, counted exactly). ``cram``: the new expert still trainable (a
          decode between training steps); ``cram_frozen``: every expert frozen, as ``after_task`` leaves them
          for evaluation.
data      the LoRA's training step fed by the data path (image files decoded and processed by LLaVA's own
          processor at 336 px in DataLoader workers, pinned, copied without blocking) against the same step on
          pre-made tensors already on the device; blocks of steps alternate, medians of the blocks.
Prints tables and one JSON line (``--json`` also writes it).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from _timing import count_ops, emit, side_by_side, synchronizer

from cramcl.adapters.inject import inject_adapters  # noqa: E402
from cramcl.adapters.multi_lora import RoutingContext  # noqa: E402
from cramcl.methods.cram.centroids import group_layer_weights, scatter_group_weights  # noqa: E402
from cramcl.methods.cram.penalty import OrthogonalityPenalty  # noqa: E402
from cramcl.utils.device import to_device  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EMBED_DIM = 768  # CLIP ViT-L/14's projected image embedding (the routing space)


def build_model(tiny: bool, image_token: int, device, dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if tiny:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=56, patch_size=14)
        text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=2048)
    else:  # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 + Vicuna-7B
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, config


def synthetic_batch(config, image_token, batch, text_len, device, dtype, gen: torch.Generator):
    v = config.vision_config
    n_img = (v.image_size // v.patch_size) ** 2  # "default" strategy drops CLS
    ids = torch.randint(image_token + 1, config.text_config.vocab_size - 1, (batch, n_img + text_len), generator=gen)
    ids[:, 1:1 + n_img] = image_token
    labels = torch.full_like(ids, -100)
    labels[:, -32:] = ids[:, -32:]
    pixels = torch.randn(batch, 3, v.image_size, v.image_size, generator=gen).to(dtype)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "labels": labels}
    return {k: t.to(device) for k, t in out.items()}


class Adapters:
    """One variant's adapters on the model's language model (removed again by :meth:`remove`)."""

    def __init__(self, model, variant: str, device, history: int = 3, other: int = 4, seed: int = 0,
                 fuse: bool | None = None):
        self.model, self.variant = model, variant
        self.lm = model.model.language_model
        self.ctx = RoutingContext()
        self.ctx.fuse_trainable = fuse  # None: the library's default for the device
        L = len(self.lm.layers)
        self.layers = inject_adapters(self.lm, TARGETS, L * 4, self.ctx, dropout=0.05)
        g = torch.Generator().manual_seed(seed)
        ranks = [int(r) for r in torch.randint(4, 10, (other + history,), generator=g)]
        self.group = [1] * other + [0] * history + [0]  # the new expert last, in group 0
        self.active_rank = sum(ranks[other:]) + 8
        self.trainable = []
        if variant == "lora":
            for layer in self.layers.values():
                k = layer.add_expert(self.active_rank, alpha=2.0 * self.active_rank)
                self.trainable += [layer.experts_A[k], layer.experts_B[k]]
            return
        for layer in self.layers.values():
            for r in ranks:
                k = layer.add_expert(A=torch.randn(r, layer.in_features, generator=g) * 0.01,
                                     B=torch.randn(layer.out_features, r, generator=g) * 0.01)
                layer.set_expert_trainable(k, False)
            k = layer.add_expert(A=torch.randn(8, layer.in_features, generator=g) * 0.01,
                                 B=torch.randn(layer.out_features, 8, generator=g) * 0.01)
            self.trainable += [layer.experts_A[k], layer.experts_B[k]]
            layer.to(device)
        K = len(self.group)
        self.centroids = torch.nn.functional.normalize(torch.randn(L, K, EMBED_DIM, generator=g), dim=-1).to(device)
        self.new_centroids = torch.nn.Parameter(self.centroids[:, -1].clone())
        self.trainable.append(self.new_centroids)
        self.history = [k for k, gr in enumerate(self.group[:-1]) if gr == 0]
        for layer in self.layers.values():
            layer.to(device)
        self.penalty = OrthogonalityPenalty()  # CramMethod's own: per module on a CPU, batched on a GPU
        self.penalty.start(self.layers, len(self.group) - 1, self.history, device)

    def route(self, groups: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """(L, B, K) weights, per sample within its group, as CramMethod.routing_weights builds them."""
        cents = torch.cat([self.centroids[:, :-1], self.new_centroids.unsqueeze(1)], dim=1)
        per_group = {}
        for g in groups.unique().tolist():
            experts = [k for k, gr in enumerate(self.group) if gr == g]
            rows = (groups == g).nonzero(as_tuple=True)[0]
            w = group_layer_weights(q[to_device(rows, q.device)], cents[:, experts], 0.25, "per_sample", "gap")
            per_group[g] = (rows, w, experts)
        self.ctx.active = tuple(k for k, gr in enumerate(self.group) if gr in per_group)
        return scatter_group_weights(per_group, q.shape[0], len(self.group), cents.shape[0])

    def loss(self, batch, q) -> torch.Tensor:
        if self.variant == "lora":
            return self.model(**batch).loss
        B = batch["input_ids"].shape[0]
        weights = self.route(torch.zeros(B, dtype=torch.long), q)
        mask = (batch["input_ids"] == self.model.config.image_token_index).unsqueeze(-1)
        img = mask.to(dtype=batch["pixel_values"].dtype)  # cast once per batch, as CramMethod does
        weights_c = weights.to(batch["pixel_values"].dtype)
        self.ctx.route = lambda layer, x: weights_c[layer.layer_index]
        self.ctx.capture = lambda layer, x: self.penalty.capture(layer, x, img)
        self.penalty.pooled = {}
        loss = self.model(**batch).loss
        gates = weights[:, :, self.history].sum(-1)  # (L, B)
        return loss + self.penalty(self.layers, gates).mean()

    def remove(self):
        for name, module in list(self.lm.named_modules()):
            for child_name, child in list(module.named_children()):
                if any(child is l for l in self.layers.values()):
                    setattr(module, child_name, child.base)


def peft_lora(model, rank: int):
    """The same LoRA through PEFT on the language model's q, k, v, o (None when PEFT is not installed)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        return None
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                     target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)")
    inject_adapter_in_model(cfg, model)
    return [p for n, p in model.named_parameters() if "lora_" in n]


def remove_peft(model):
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoraLayer):
                setattr(module, child_name, child.get_base_layer())


def train_step_fn(loss_fn, params):
    opt = torch.optim.AdamW(params, lr=2e-4)

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_step(model, config, image_token, args, device, dtype, sync, checkpointing: bool, batch_size: int) -> dict:
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()
    gen = torch.Generator().manual_seed(1)
    batch = synthetic_batch(config, image_token, batch_size, args.text_len, device, dtype, gen)
    q = torch.nn.functional.normalize(torch.randn(batch_size, EMBED_DIM, generator=gen), dim=-1).to(device)
    out = {"batch": batch_size, "seq_len": batch["input_ids"].shape[1], "gradient_checkpointing": checkpointing}
    times, peaks = {}, {}
    for variant in ("lora", "cram_split", "cram_fused", "peft"):
        if variant == "peft":
            params = peft_lora(model, out.get("active_rank", 8))
            if params is None:
                continue
            fn = train_step_fn(lambda: model(**batch).loss, params)
        else:
            ad = Adapters(model, variant.split("_")[0], device, fuse=variant.endswith("_fused"))
            out["active_rank"] = ad.active_rank
            fn = train_step_fn(lambda: ad.loss(batch, q), ad.trainable)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        times[variant] = side_by_side({variant: fn}, args.steps, warmup=2, sync=sync)[variant]
        peaks[variant] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        if args.profile and variant in ("lora", "cram_split", "cram_fused"):
            profile(fn, f"{args.profile}/profile_step_{variant}_{'ckpt' if checkpointing else 'nockpt'}.txt", sync)
        ad.remove() if variant != "peft" else remove_peft(model)
    # a second lora measurement after the others: the first one also warmed the allocator and kernels
    ad = Adapters(model, "lora", device)
    times["lora_again"] = side_by_side({"l": train_step_fn(lambda: ad.loss(batch, q), ad.trainable)}, args.steps,
                                       warmup=2, sync=sync)["l"]
    ad.remove()
    lora = min(times["lora"], times["lora_again"])
    out.update({f"{k}_step_s": round(v, 4) for k, v in times.items()})
    out.update({f"{k}_peak_gib": round(v, 2) for k, v in peaks.items() if v is not None})
    for variant in ("cram_split", "cram_fused"):
        out[f"{variant}_over_lora"] = round(times[variant] / lora, 3)
    if "peft" in times:
        out["lora_over_peft"] = round(lora / times["peft"], 3)
    model.gradient_checkpointing_disable()
    return out


def profile(fn, path: str, sync) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync()
    with torch_profile(activities=acts) as prof:
        fn()
        sync()
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    Path(path).write_text(prof.key_averages().table(sort_by=key, row_limit=30) + "\n\nby self time\n" +
                          prof.key_averages().table(sort_by="self_" + key, row_limit=30))


@torch.no_grad()
def bench_generate(model, config, image_token, args, device, dtype, sync) -> dict:
    model.eval()
    gen = torch.Generator().manual_seed(2)
    batch = synthetic_batch(config, image_token, 8, 32, device, dtype, gen)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    q = torch.nn.functional.normalize(torch.randn(8, EMBED_DIM, generator=gen), dim=-1).to(device)
    groups = torch.tensor([0, 1] * 4)
    new_tokens = args.new_tokens
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
              pad_token_id=0, eos_token_id=None)
    # the variants' adapters cannot coexist on one model: blocks of repeats alternate, medians over all blocks
    samples = {"lora": [], "cram": [], "cram_frozen": []}
    ops = {}  # operators (kernel launches on a GPU) of one generate call
    for _ in range(args.blocks):
        for variant in samples:
            ad = Adapters(model, variant.split("_")[0], device, seed=3)
            if variant == "cram_frozen":
                for layer in ad.layers.values():
                    layer.set_expert_trainable(layer.num_experts - 1, False)

            def run(ad=ad):
                if ad.variant == "cram":
                    weights = ad.route(groups, q).to(dtype)  # once per batch, in the model's dtype, as CramMethod
                    ad.ctx.route = lambda layer, x: weights[layer.layer_index]  # does: every decoding step reuses
                return model.generate(**inputs, **kw)
            run()  # warm-up
            ops[variant] = count_ops(run)
            for _ in range(args.gen_repeats):
                sync()
                t0 = time.perf_counter()
                run()
                sync()
                samples[variant].append(time.perf_counter() - t0)
            ad.remove()
    times = {k: statistics.median(v) for k, v in samples.items()}
    tokens = 8 * new_tokens
    return {"batch": 8, "new_tokens": new_tokens, **{f"{k}_s": round(v, 4) for k, v in times.items()},
            **{f"{k}_tokens_per_s": round(tokens / v, 1) for k, v in times.items()},
            "cram_over_lora": round(times["cram"] / times["lora"], 3),
            "cram_frozen_over_lora": round(times["cram_frozen"] / times["lora"], 3),
            **{f"{k}_ops": v for k, v in ops.items()},
            "ops_cram_over_lora": round(ops["cram"] / ops["lora"], 3),
            "ops_cram_frozen_over_lora": round(ops["cram_frozen"] / ops["lora"], 3)}


def bench_data(model, args, device, dtype, sync, image_token: int, tok) -> dict:
    """LoRA training steps on pre-made tensors vs fed by the data path from image files."""
    from PIL import Image
    from transformers import CLIPImageProcessor, LlavaProcessor

    from cramcl.backbones.hf.chat import ChatFormat
    from cramcl.backbones.hf.collate import HFCollator
    from cramcl.data.records import Record
    from cramcl.engine.loader import available_cpus, make_loader, resolve_workers

    size = model.config.vision_config.image_size
    patch = model.config.vision_config.patch_size
    ip = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, num_additional_image_tokens=1,
                          vision_feature_select_strategy="default", chat_template=tok.chat_template)
    chat = ChatFormat(proc, [tok.eos_token_id], tok.eos_token_id, "bench")
    keys = frozenset({"input_ids", "attention_mask", "pixel_values", "labels"})
    collator = HFCollator(proc, chat, keys, tok.pad_token_id, image_token, dtype, 2048, {})
    tmp = Path(tempfile.mkdtemp())
    g = torch.Generator().manual_seed(4)
    records = []
    for i in range(args.images):  # photo-sized JPEGs, as benchmark images are
        arr = (torch.rand(480, 640, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(tmp / f"{i}.jpg", quality=90)
        records.append(Record(str(i), tmp / f"{i}.jpg", "What is shown in the image?", "a random pattern"))
    workers = resolve_workers("auto", SimpleNamespace(collator=collator))
    bs = args.data_batch
    batches = [list(range((s * bs) % len(records), (s * bs) % len(records) + bs)) for s in range(10_000)]
    batches = [[i % len(records) for i in b] for b in batches]
    on_gpu = str(device).startswith("cuda")
    loader = make_loader(records, batches, bs, SimpleNamespace(collator=collator, collate=collator), train=True,
                         workers=workers, pin=on_gpu)
    stream = iter(loader)
    premade = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collator(records[:bs], True).items()}
    keys_in = ("input_ids", "attention_mask", "pixel_values", "labels")
    ad = Adapters(model, "lora", device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(ad.trainable, lr=2e-4)

    def step(batch):
        model(**{k: batch[k] for k in keys_in}).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def fed():
        batch = next(stream)
        step({k: (batch[k].to(device, non_blocking=on_gpu)) for k in keys_in})

    t0 = time.perf_counter()
    collator(records[:bs], True)
    collate_s = time.perf_counter() - t0
    per_block = {"premade": [], "loader": []}
    for _ in range(2):  # warm-up: kernels, allocator, workers started and prefetching
        fed(), step(premade)
    for _ in range(args.blocks):
        for name, fn in (("premade", lambda: step(premade)), ("loader", fed)):
            sync()
            t0 = time.perf_counter()
            for _ in range(args.block_steps):
                fn()
            sync()
            per_block[name].append((time.perf_counter() - t0) / args.block_steps)
    ad.remove()
    model.gradient_checkpointing_disable()
    pre, fed_s = statistics.median(per_block["premade"]), statistics.median(per_block["loader"])
    return {"batch": bs, "image_px": "640x480 jpeg", "processor_px": size, "workers": workers,
            "cpus": available_cpus(), "collate_one_batch_in_main_s": round(collate_s, 4),
            "premade_step_s": round(pre, 4), "loader_step_s": round(fed_s, 4),
            "loader_over_premade": round(fed_s / pre, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--only", default="step,generate,data")
    ap.add_argument("--text-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--gen-repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--data-batch", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--block-steps", type=int, default=4)
    ap.add_argument("--profile", help="a folder for torch.profiler tables of one lora and one cram step")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"),
                    help="default: bfloat16 on a GPU, float32 on the CPU (bfloat16 there counts a GPU run's operators)")
    ap.add_argument("--json")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device == "cuda" else torch.float32
    sync = synchronizer(device)
    from cramcl.backbones.hf.tiny_models import build_tokenizer

    tok = build_tokenizer("llava")
    image_token = tok.convert_tokens_to_ids("<image>")
    t0 = time.perf_counter()
    model, config = build_model(args.tiny, image_token, device, dtype)
    result = {"shapes": "tiny" if args.tiny else "llava-1.5-7b", "dtype": str(dtype).removeprefix("torch."),
              "build_s": round(time.perf_counter() - t0, 1)}
    only = args.only.split(",")
    if "step" in only:
        result["step_ckpt_b8"] = bench_step(model, config, image_token, args, device, dtype, sync, True, 8)
        print(result["step_ckpt_b8"], flush=True)
        result["step_b4"] = bench_step(model, config, image_token, args, device, dtype, sync, False, 4)
        print(result["step_b4"], flush=True)
    if "generate" in only:
        result["generate"] = bench_generate(model, config, image_token, args, device, dtype, sync)
        print(result["generate"], flush=True)
    if "data" in only:
        result["data"] = bench_data(model, args, device, dtype, sync, image_token, tok)
        print(result["data"], flush=True)
    emit("llava_suite", result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
