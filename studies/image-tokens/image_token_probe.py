"""Is a task's answer in the image tokens the LM receives? A linear probe (logistic regression on the task's
training records, scored on its test records) at three points of the tiny backbone's image path.

    python studies/image-tokens/image_token_probe.py --tasks digits,ocr [--profile default] [--base PATH]
    python studies/image-tokens/image_token_probe.py --tasks caption --relation

With ``--relation`` the label is not the answer but the spatial relation a caption states ("left of",
"above", or none: one shape), i.e. whether the image path passes on how two shapes are arranged.

Points: the frozen EfficientNet-Lite0 tokens (9 x 1280 at 96 px, flattened) and their mean (1280); the
tokens after the base's projector (9 x 256, what the LM reads; the shipped base by default); and after a
randomly initialised projector of the same shape (seed 0), to tell what training the projector changed. A
task whose probe is far above what `mtl` / one-task LoRA reach is limited by the LM's learning of the answer,
not by what the image path passes on.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def _projector(state: dict | None, hidden_size: int) -> torch.nn.Module:
    from cramcl.backbones.tiny.model import make_projector

    torch.manual_seed(0)
    proj = make_projector(hidden_size)
    if state is not None:
        proj.load_state_dict(state)
    return proj.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="digits,ocr")
    ap.add_argument("--profile", default="default")
    ap.add_argument("--base", default="", help="a saved base's folder (default: the shipped one)")
    ap.add_argument("--relation", action="store_true", help="label captions by the relation they state")
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegression

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "caption-relation"))
    from caption_relation import relation

    from cramcl.backbones.tiny.saved_base import resolve_base_path
    from cramcl.backbones.tiny.vision import EfficientNetFeatures
    from cramcl.config import resolve_config
    from cramcl.data.stream import load_stream

    torch.set_num_threads(1)
    cfg = resolve_config(method="mtl", profile=args.profile)
    bench = load_stream(cfg.data)
    base = args.base or resolve_base_path(cfg.backbone.base_path, cfg.data.benchmark)
    weights = load_file(f"{base}/base.safetensors")
    state = {k.removeprefix("projector."): v for k, v in weights.items() if k.startswith("projector.")}
    hidden = state["0.weight"].shape[0]
    trained, random = _projector(state, hidden), _projector(None, hidden)
    vision = EfficientNetFeatures(cfg.backbone.image_size)
    print(f"base: {base}")
    print("| task | frozen tokens | frozen, mean-pooled | after the base's projector (LM input) | after a random projector |")
    print("|---|---|---|---|---|")
    for name in args.tasks.split(","):
        task = next(t for t in bench.tasks if t.name == name)
        views = {}
        for split, records in (("train", list(task.train)), ("test", list(task.test))):
            digests = vision.prepare([r.image for r in records], desc=f"{name} {split}")
            tokens = vision.features([digests[r.image] for r in records])  # (N, n_tokens, 1280)
            with torch.no_grad():
                views[split] = [tokens.flatten(1), tokens.mean(1), trained(tokens).flatten(1), random(tokens).flatten(1)]
            views[split + "_y"] = [(relation(r.answer) or "one shape") if args.relation else r.answer
                                   for r in records]
        scores = []
        for i in range(4):
            clf = LogisticRegression(max_iter=3000).fit(views["train"][i].numpy(), views["train_y"])
            scores.append(100 * clf.score(views["test"][i].numpy(), views["test_y"]))
        print(f"| {name} | " + " | ".join(f"{s:.1f}" for s in scores) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
