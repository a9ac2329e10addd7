"""CRAM's stable-phase training step against plain LoRA on a random-weight model with LLaVA-1.5-7B's shapes.

Measured side by side in one process (so the ratio is what counts, not the absolute times):
  lora  : one rank-8 LoRA expert on q, k, v, o of all 32 decoder layers (128 modules), weights all ones.
  cram  : the stable phase of a task joining a group that already holds ``--history`` experts (ragged ranks
          4..9): one concatenated matmul per module over every expert, per-sample RBF weights per layer
          from learnable centroids, the new expert (rank 8) and its centroids training, and the gated
          orthogonality penalty on every adapted module (image-token-pooled inputs).
Prints (and writes with --json) the median step time, tokens/s and peak memory of each, and their ratio.

    python bench/gpu_cram_step.py --json out.json            # on a GPU (bf16)
    python bench/gpu_cram_step.py --tiny                     # a CPU smoke run of the same code path
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cramcl.adapters.inject import inject_adapters  # noqa: E402
from cramcl.adapters.multi_lora import RoutingContext  # noqa: E402
from cramcl.methods.cram_math import gated_orthogonality_penalty, orth_history_basis  # noqa: E402
from cramcl.routing.centroid import rbf_routing_weights  # noqa: E402


def build_llava(tiny: bool, device, dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if tiny:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=28, patch_size=14)
        text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=320)
        image_token = 300
    else:  # llava-hf/llava-1.5-7b-hf shapes: CLIP ViT-L/14-336 + Vicuna-7B
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
        image_token = 32000
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    model.eval()
    return model, config, image_token


def make_batch(config, image_token, batch, text_len, device, dtype):
    v = config.vision_config
    n_img = (v.image_size // v.patch_size) ** 2  # "default" strategy drops CLS
    L = n_img + text_len
    ids = torch.randint(0, image_token - 1, (batch, L), device=device)
    ids[:, 1:1 + n_img] = image_token
    labels = torch.full_like(ids, -100)
    labels[:, -32:] = ids[:, -32:]
    pixels = torch.randn(batch, 3, v.image_size, v.image_size, device=device, dtype=dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "labels": labels}


def setup_variant(model, variant: str, history: int, num_layers: int, device, seed=0):
    ctx = RoutingContext()
    layers = inject_adapters(model.model.language_model, ["q_proj", "k_proj", "v_proj", "o_proj"], num_layers * 4,
                             ctx, dropout=0.05)
    gen = torch.Generator().manual_seed(seed)
    trainable = []
    state = {"ctx": ctx, "layers": layers}
    if variant == "lora":
        for layer in layers.values():
            layer.add_expert(8, alpha=16)
            trainable += [layer.experts_A[0], layer.experts_B[0]]
        return state, trainable
    ranks = [int(r) for r in torch.randint(4, 10, (history,), generator=gen)]
    for layer in layers.values():
        for r in ranks:  # earlier experts of the group: frozen, ragged ranks
            layer.add_expert(A=torch.randn(r, layer.in_features, generator=gen) * 0.01,
                             B=torch.randn(layer.out_features, r, generator=gen) * 0.01)
            layer.set_expert_trainable(layer.num_experts - 1, False)
        new = layer.add_expert(A=torch.randn(8, layer.in_features, generator=gen) * 0.01,
                               B=torch.randn(layer.out_features, 8, generator=gen) * 0.01)
        trainable += [layer.experts_A[new], layer.experts_B[new]]
    D = 768
    K = history + 1
    centroids = torch.randn(num_layers, K, D, device=device)
    new_centroids = torch.nn.Parameter(centroids[:, -1].clone())
    trainable.append(new_centroids)
    state.update(centroids=centroids, new_centroids=new_centroids, D=D, K=K, q_hist={
        key: orth_history_basis([l.experts_A[k].float() for k in range(history)],
                                [l.experts_B[k].float() for k in range(history)], l.in_features, l.out_features).to(device)
        for key, l in layers.items()})
    return state, trainable


def cram_loss(model, state, batch, image_token):
    ctx, layers = state["ctx"], state["layers"]
    B = batch["input_ids"].shape[0]
    q = torch.nn.functional.normalize(torch.randn(B, state["D"], device=batch["input_ids"].device), dim=-1)
    cents = torch.cat([state["centroids"][:, :-1], state["new_centroids"].unsqueeze(1)], dim=1)  # (L, K, D)
    weights = torch.stack([rbf_routing_weights(q, cents[l], 2.0) for l in range(cents.shape[0])])  # (L, B, K)
    ctx.route = lambda layer, x: weights[layer.layer_index]
    pooled = {}
    mask = (batch["input_ids"] == image_token).unsqueeze(-1)

    def capture(layer, x):
        m = mask.to(x.dtype)
        pooled[layer.key] = ((x * m).sum(1) / m.sum(1).clamp(min=1)).detach()

    ctx.capture = capture
    loss = model(**batch).loss
    penalties = []
    for key, layer in layers.items():
        A, Bm = layer.experts_A[-1], layer.experts_B[-1]
        z = (pooled[key].to(A.dtype) @ A.t()) @ Bm.t()
        gate = weights[layer.layer_index][:, :-1].sum(-1)
        penalties.append(gated_orthogonality_penalty(z, state["q_hist"][key], gate))
    return loss + torch.stack(penalties).mean()


def measure(model, state, trainable, batch, variant, image_token, steps, warmup, sync):
    opt = torch.optim.AdamW(trainable, lr=2e-4)
    times = []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        loss = cram_loss(model, state, batch, image_token) if variant == "cram" else model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    med = statistics.median(times)
    tokens = batch["input_ids"].numel()
    return {"median_step_s": med, "tokens_per_s": tokens / med, "peak_mem_gib": peak, "steps": steps}


def remove_adapters(model, layers):
    for layer in layers.values():
        parent = model.model.language_model.get_submodule(
            next(p for p, m in model.model.language_model.named_modules() if m is layer).rpartition(".")[0])
        name = next(n for n, m in parent.named_children() if m is layer)
        setattr(parent, name, layer.base)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-len", type=int, default=128)
    ap.add_argument("--history", type=int, default=3, help="earlier experts in the group")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model, config, image_token = build_llava(args.tiny, device, dtype)
    if not args.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # checkpointing is active in train mode; frozen base has no dropout
    batch = make_batch(config, image_token, args.batch, args.text_len, device, dtype)
    L = config.text_config.num_hidden_layers
    results = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "dtype": str(dtype),
               "batch": args.batch, "seq_len": batch["input_ids"].shape[1], "history_experts": args.history,
               "gradient_checkpointing": not args.no_checkpointing, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d")}
    for variant in ("lora", "cram", "lora"):  # lora twice: the first warms caches, the second is reported
        state, trainable = setup_variant(model, variant, args.history, L, device)
        model.to(device)
        results[variant] = measure(model, state, trainable, batch, variant, image_token, args.steps, args.warmup, sync)
        results[variant]["trainable_params"] = sum(p.numel() for p in trainable)
        remove_adapters(model, state["layers"])
        del state, trainable
        if device == "cuda":
            torch.cuda.empty_cache()
    results["cram_over_lora_step_time"] = results["cram"]["median_step_s"] / results["lora"]["median_step_s"]
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
