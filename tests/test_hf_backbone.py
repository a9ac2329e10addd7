"""The real-model backbone on tiny random-weight models of real architectures (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL,
Idefics3, InternVL, LLaVA-OneVision, Gemma 3; built from config, saved with save_pretrained and loaded by path
like a user's checkpoint): prompts and labels, image tokens, adapter injection on the LLM only, LoRA training
with gradient checkpointing, batched greedy generation, routing features, a CRAM run end to end and its PEFT
export. CPU, no network."""
from __future__ import annotations

import dataclasses
import inspect
import json
import os

import torch

torch.set_num_threads(1)

import pytest  # noqa: E402

from cramcl.adapters.inject import inject_adapters  # noqa: E402
from cramcl.adapters.multi_lora import MultiLoRALinear, RoutingContext  # noqa: E402
from cramcl.backbones.hf import HFBackbone, HFOptions  # noqa: E402
from cramcl.backbones.hf.tiny_models import (ARCHITECTURES, IMAGE_TOKENS, ONEVISION_IMAGE_TOKENS,  # noqa: E402
                                              build_tiny_model)
from cramcl.data.records import Record  # noqa: E402
from cramcl.errors import BadInputError  # noqa: E402

QA = [("What shape is in the image?", "circle"), ("What colour is the shape?", "dark red"),
      ("How many dots are there?", "3"), ("Is there a star in the picture? Answer yes or no.", "no")]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _quiet(*_):
    pass


@pytest.fixture(scope="session")
def image_records(tmp_path_factory) -> list[Record]:
    """Square images of one coloured shape each (32 and 48 px: the processors resize them)."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("hf-images")
    colours = ["red", "green", "blue", "yellow", "white", "purple"]
    records = []
    for i in range(8):
        size = 32 if i % 2 == 0 else 48
        im = Image.new("RGB", (size, size), "black")
        ImageDraw.Draw(im).ellipse([2 + i % 4, 3, size - 4, size - 2 - i % 3], fill=colours[i % len(colours)])
        path = root / f"img{i}.png"
        im.save(path)
        q, a = QA[i % len(QA)]
        records.append(Record(f"r{i}", path.resolve(), q, a))
    return records


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf-models")
    return {arch: str(build_tiny_model(arch, root / arch)) for arch in ARCHITECTURES}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def bb(request, model_dirs) -> HFBackbone:
    return HFBackbone(HFOptions(model_path=model_dirs[request.param], max_new_tokens=6, gradient_checkpointing=True),
                      log=_quiet)


def test_labels_are_the_answer_and_eos_only(bb, image_records):
    recs = image_records[:4]
    batch = bb.collate(recs, train=True)
    assert batch["records"] is recs
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for i, r in enumerate(recs):
        ids = batch["labels"][i][batch["labels"][i] != -100]
        assert bb.tokenizer.decode(ids).strip() == r.answer + bb.tokenizer.decode([ids[-1]])
        assert ids[-1].item() in bb.stop_ids
        # the labelled tokens are the last real tokens of the row (right padding for training)
        n = int(batch["attention_mask"][i].sum())
        assert batch["attention_mask"][i, :n].all()
        assert torch.equal(batch["input_ids"][i, n - len(ids):n], ids)
        # the end-of-turn label is the one the template writes (not an eos appended in its place)
        assert bb.tokenizer.decode(ids).strip() == bb.chat.completion_text(r.question, r.answer).strip()
        # one bos at most, first (a template that writes it, as Gemma 3's does, gets no second one)
        bos, row = bb.tokenizer.bos_token_id, batch["input_ids"][i, :n].tolist()
        assert bos is None or row.count(bos) == int(row[0] == bos)
    assert not bool((batch["labels"] != -100)[batch["image_mask"]].any())


def _image_tokens(bb, records) -> list[int]:
    """Tokens per image of the tiny models: 16, except LLaVA-OneVision's anyres grid (by image side)."""
    from PIL import Image

    if bb.model.config.model_type != "llava_onevision":
        return [IMAGE_TOKENS] * len(records)
    return [ONEVISION_IMAGE_TOKENS[Image.open(r.image).width] for r in records]


def test_image_mask_counts_the_image_tokens(bb, image_records):
    batch = bb.collate(image_records[:4], train=False)
    mask = batch["image_mask"]
    assert mask.dtype == torch.bool and mask.shape == batch["input_ids"].shape
    assert mask.sum(1).tolist() == _image_tokens(bb, image_records[:4])
    assert torch.equal(mask, batch["input_ids"] == bb.model.config.image_token_id)
    if "image_grid_thw" in batch:  # Qwen2-VL: one token per merged 2x2 patch group
        assert batch["image_grid_thw"].prod(-1).div(4).tolist() == [IMAGE_TOKENS] * 4
        assert "mm_token_type_ids" in batch


def test_a_non_square_image_gets_as_many_tokens_as_the_model_gives_features(bb, tmp_path):
    """The processor's image-token count (dynamic resolution, anyres unpadding) is what the model fills."""
    from PIL import Image

    Image.new("RGB", (56, 24), "teal").save(tmp_path / "wide.png")
    batch = bb.collate([Record("wide", tmp_path / "wide.png", *QA[0])], train=True)
    assert bb._image_features(batch).shape[0] == int(batch["image_mask"].sum()) > 0
    with torch.no_grad():
        assert torch.isfinite(bb.model(**bb.model_inputs(batch)).loss)


def test_adapters_go_on_the_llm_only_and_train_with_checkpointing(bb, image_records):
    context = RoutingContext()
    layers = inject_adapters(bb.language_model, TARGETS, bb.num_layers * len(TARGETS), context)
    assert len(layers) == bb.num_layers * 4 == bb.model.config.get_text_config().num_hidden_layers * 4
    paths = [n for n, m in bb.model.named_modules() if isinstance(m, MultiLoRALinear)]
    assert len(paths) == len(layers)
    assert not [p for p in paths if "vision" in p or "visual" in p], paths
    assert not any(p.requires_grad for p in bb.model.parameters())

    torch.manual_seed(0)
    for layer in layers.values():
        layer.add_expert(4, alpha=8.0)
    params = [p for layer in layers.values() for p in (layer.experts_A[0], layer.experts_B[0])]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = bb.collate(image_records[:4], train=True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in bb.model.modules())
    bb.model.train()
    losses = []
    try:
        for _ in range(6):
            loss = bb.model(**bb.model_inputs(batch)).loss
            loss.backward()
            assert all(p.grad is not None for p in params)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    finally:
        bb.model.eval()
    assert losses[-1] < losses[0] - 0.5, losses


def test_generate_is_left_padded_and_independent_of_batch_mates(bb, image_records):
    recs = image_records[:4]
    batch = bb.collate(recs, train=False)
    lengths = batch["attention_mask"].sum(1)
    assert "labels" not in batch and int(lengths.min()) < int(lengths.max())
    assert batch["attention_mask"][:, -1].all()  # left padding: every prompt ends at the last column
    out = bb.generate(bb.model, batch)
    assert len(out) == len(recs) and all(isinstance(s, str) for s in out)
    singles = [bb.generate(bb.model, bb.collate([r], train=False))[0] for r in recs]
    assert singles == out
    calls = []
    bb.generate(bb.model, bb.collate(recs[:1], train=False), on_step=lambda: calls.append(1))
    assert calls


def test_pooled_image_features_shape_and_determinism(bb, image_records):
    recs = image_records[:5]
    feats = bb.pooled_image_features(recs)
    assert feats.shape == (5, bb.model.config.get_text_config().hidden_size) and feats.dtype == torch.float32
    bb._feature_cache.clear()
    again = torch.cat([bb.pooled_image_features([r]) for r in reversed(recs)]).flip(0)
    assert torch.allclose(feats, again, atol=1e-5)
    # the projected features from get_image_features are what the LLM receives at the image positions
    hooked = torch.stack([bb._embeds_at_image_tokens(bb.collate([r], train=False)).float().mean(0) for r in recs])
    assert torch.allclose(feats, hooked, atol=1e-5)
    assert not torch.allclose(feats[0], feats[1])


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_processor_kwargs_reach_the_image_processor(arch, model_dirs, image_records):
    # Qwen2(.5)-VL at 16x16 pixels: 4x4 patches of 4 px, merged 2x2 -> 4 image tokens instead of 16
    size = {"shortest_edge": 256, "longest_edge": 256}  # Qwen2-VL's min / max pixels
    bb = HFBackbone(HFOptions(model_path=model_dirs[arch], processor_kwargs={"size": size}), log=_quiet)
    assert bb.collate(image_records[:2], train=False)["image_mask"].sum(1).tolist() == [4, 4]


def test_missing_model_path_is_bad_input(tmp_path, monkeypatch):
    with pytest.raises(BadInputError, match="nope"):
        HFBackbone(model_path=str(tmp_path / "nope"), log=_quiet)
    monkeypatch.delenv("CRAMCL_TEST_UNSET", raising=False)
    with pytest.raises(BadInputError, match="CRAMCL_TEST_UNSET"):
        HFBackbone(model_path="$CRAMCL_TEST_UNSET/llava", log=_quiet)


def test_options_from_config_and_describe(model_dirs):
    @dataclasses.dataclass
    class Cfg:  # a BackboneConfig with the fields the lead adds
        model_path: str
        max_new_tokens: int = 3
        dtype: str = "float32"
        image_size: int = 96  # unrelated fields are ignored

    opts = HFOptions.from_config(Cfg(model_dirs["llava"]))
    assert (opts.max_new_tokens, opts.dtype, opts.gradient_checkpointing) == (3, "float32", False)
    bb = HFBackbone(opts, log=_quiet)
    info = bb.describe()
    assert info["backbone"] == "hf" and info["num_layers"] == 2 and info["dtype"] == "float32"
    json.dumps(info)


# ---------------------------------------------------------------- CRAM end to end
def _benchmark(tmp_path, records) -> str:
    root = tmp_path / "bench"
    (root / "shape").mkdir(parents=True)
    rows = [{"id": r.id, "image": str(r.image), "question": r.question, "answer": r.answer} for r in records]
    (root / "shape" / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    (root / "shape" / "test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows[:4]))
    task = "  - {name: shape, train: shape/train.jsonl, test: shape/test.jsonl, scorer: exact}\n"
    (root / "bench.yaml").write_text(f"name: tiny-hf\nimage_root: {records[0].image.parent}\ntasks:\n{task}")
    return str(root / "bench.yaml")


CRAM_OVERRIDES = ["train.steps_per_task=4", "train.batch_size=4", "train.eval_batch_size=4", "train.log_every=2",
                  "method.group_init_samples=4", "method.warmup_fraction=0.25", "method.buffer_rank=8",
                  "method.buffer_alpha=16", "backbone.max_new_tokens=4"]


def _check_cram_run(out, num_layers: int) -> None:
    from cramcl.engine.checkpoint import load_checkpoint

    matrix = json.loads((out / "results" / "matrix.json").read_text())
    assert matrix["tasks"] == ["shape"] and isinstance(matrix["scores"][0][0], float)
    _, meta, _ = load_checkpoint(out / "checkpoints" / "task_0")
    adapters = meta["adapters"]
    assert len(adapters) == num_layers * len(TARGETS)  # the adapted-module count
    # warm-up trained the buffer, consolidation made one expert per module, the stable phase trained it
    assert all(len(m["ranks"]) == 1 and 4 <= m["ranks"][0] <= 9 and not m["buffer"] for m in adapters.values())
    assert (out / "results" / "predictions" / "after_0" / "shape.jsonl").is_file()


def test_cram_end_to_end_on_tiny_llava(tmp_path, model_dirs, image_records, monkeypatch):
    """Through the runner with the factory replaced (works before the lead wires `hf` into it)."""
    import cramcl.backbones
    from cramcl.config import resolve_config
    from cramcl.engine.runner import run_stream

    def factory(run_cfg, bench, log=print):
        return HFBackbone(HFOptions(model_path=model_dirs["llava"], max_new_tokens=run_cfg.backbone.max_new_tokens,
                                    gradient_checkpointing=True), log=log)

    monkeypatch.setattr(cramcl.backbones, "build_backbone", factory)
    # routing features come from one batched pass per task (Method.precompute), never from a training or
    # evaluation batch: every model pass that pools image features happens inside precompute
    from cramcl.methods.base import Method

    inside, outside = [0], []
    real_precompute, real_pool = Method.precompute, HFBackbone._pool

    def precompute(self, records):
        inside[0] += 1
        try:
            return real_precompute(self, records)
        finally:
            inside[0] -= 1

    def pool(self, records):
        if not inside[0]:
            outside.append(len(records))
        return real_pool(self, records)

    monkeypatch.setattr(Method, "precompute", precompute)
    monkeypatch.setattr(HFBackbone, "_pool", pool)
    cfg = resolve_config(method="cram", profile="quick", benchmark=_benchmark(tmp_path, image_records),
                         overrides=CRAM_OVERRIDES)
    run_stream(cfg, tmp_path / "run", log=_quiet)
    _check_cram_run(tmp_path / "run", num_layers=2)
    assert outside == [], f"image features pooled outside precompute for batches of {outside}"


def _factory_supports_hf() -> bool:
    from cramcl.backbones import build_backbone
    from cramcl.config import BackboneConfig

    fields = {f.name for f in dataclasses.fields(BackboneConfig)}
    return "model_path" in fields and '"hf"' in inspect.getsource(build_backbone)


@pytest.mark.skipif(not _factory_supports_hf(), reason="backbones.build_backbone has no 'hf' branch yet")
def test_cram_run_through_the_factory(tmp_path, model_dirs, image_records):
    from cramcl.config import resolve_config
    from cramcl.engine.runner import run_stream

    os.environ["CRAMCL_TEST_MODELS"] = str(os.path.dirname(model_dirs["llava"]))
    cfg = resolve_config(method="cram", profile="quick", benchmark=_benchmark(tmp_path, image_records),
                         overrides=[*CRAM_OVERRIDES, "backbone.name=hf",
                                    "backbone.model_path=${CRAMCL_TEST_MODELS}/llava"])
    run_stream(cfg, tmp_path / "run", log=_quiet)
    _check_cram_run(tmp_path / "run", num_layers=2)


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl", "llava_onevision", "gemma3"])
def test_cram_run_and_exported_expert_loads_into_peft_with_cramcls_logits(arch, tmp_path, model_dirs, image_records):
    """A CRAM run, then cramcl export on a real architecture: the adapter's module paths are the HF model's own,
    so PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(path), OUT) computes cramcl's logits."""
    from cramcl.config import resolve_config
    from cramcl.engine.export import export_peft
    from cramcl.engine.runner import run_stream
    from cramcl.engine.session import open_finished_run

    cfg = resolve_config(method="cram", profile="quick", benchmark=_benchmark(tmp_path, image_records),
                         overrides=[*CRAM_OVERRIDES, "backbone.name=hf", f"backbone.model_path={model_dirs[arch]}"])
    run_stream(cfg, tmp_path / "run", log=_quiet)
    _check_cram_run(tmp_path / "run", num_layers=2)
    session, _, _ = open_finished_run(tmp_path / "run", log=_quiet)
    out = export_peft(session, "shape", tmp_path / "peft")
    torch.set_grad_enabled(False)
    try:
        _compare_exported(session, out, model_dirs[arch])
    finally:
        torch.set_grad_enabled(True)


def _compare_exported(session, out, model_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    m, bb = session.method, session.backbone
    batch = bb.collate(list(session.bench.tasks[0].test), train=False)
    inputs = {k: v.to(bb.device) for k, v in bb.model_inputs(batch).items()}
    m.context.route = lambda layer, x: torch.ones(x.shape[0], 1)  # the task's expert alone, weight 1
    m.context.active, m.context.buffer_weight = (0,), None
    bb.model.eval()
    want = bb.model(**inputs).logits
    base = AutoModelForImageTextToText.from_pretrained(model_path).eval()
    without = base(**inputs).logits  # before PEFT wraps the base's modules in place
    got = PeftModel.from_pretrained(base, str(out)).eval()(**inputs).logits
    effect = float((want - without).abs().max())  # what the expert changes
    assert effect > 1e-5
    assert float((got - want).abs().max()) < 0.01 * effect, (float((got - want).abs().max()), effect)


# ------------------------------------------------------------------ data path (DataLoader workers)
def test_worker_built_batches_equal_main_process_batches(bb, image_records):
    """The picklable collator runs in DataLoader workers (the model never travels) and gives exactly the batches
    the training process would build: same tensors, same records, same order."""
    from cramcl.engine.loader import make_loader

    batches = [[0, 3, 5], [7, 1], [2, 4, 6]]
    main = list(make_loader(image_records, batches, 3, bb, train=True, workers=0, pin=False))
    loader = make_loader(image_records, batches, 3, bb, train=True, workers=2, pin=False)
    assert loader.num_workers == 2
    workers = list(loader)
    assert len(workers) == len(main) == 3
    for a, b in zip(main, workers):
        assert set(a) == set(b) and [r.id for r in a["records"]] == [r.id for r in b["records"]]
        for k, v in a.items():
            if torch.is_tensor(v):
                assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k


def test_loader_workers_setting():
    """auto: none for a backbone whose batches are cheap (no collator: the embedded one), else one per spare CPU
    of this process's share, at most 8; a number is taken as given; anything else is bad input."""
    from types import SimpleNamespace

    from cramcl.config import resolve_config
    from cramcl.engine.loader import resolve_workers

    heavy, cheap = SimpleNamespace(collator=object()), SimpleNamespace()
    assert resolve_workers("auto", cheap, cpus=16) == 0
    assert resolve_workers("auto", heavy, cpus=16) == 8
    assert resolve_workers("auto", heavy, local_processes=4, cpus=16) == 3
    assert resolve_workers("auto", heavy, cpus=2) == 1
    assert resolve_workers("auto", heavy, cpus=1) == 0
    assert resolve_workers(5, cheap, cpus=1) == 5
    for bad in ("many", -1):
        with pytest.raises(BadInputError, match="loader_workers"):
            resolve_config(method="lora-ft", profile="quick", overrides=[f"train.loader_workers={bad}"])
