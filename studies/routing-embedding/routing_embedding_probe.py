"""How well candidate routing image embeddings separate the tasks of a group, before any training.

For each group of tasks named on the command line, and for each candidate embedding of the tiny backbone's
EfficientNet-Lite0 (the final features the default routes on, max-pooled final features, single blocks'
pooled outputs, and the final features joined with block 3 or block 5 as ``method.image_feature_blocks``
builds them), prints:
  gap      the smallest squared distance between two tasks' means of their training images,
  spread   the mean squared distance of a training image to its own task's mean,
  acc      per task, the share of its test images nearest its own task's mean (hard routing),
  own w    per task, the mean weight of its own mean under gap-units RBF routing at sigma 0.25 (the profile's).
The means stand in for trained centroids (CRAM starts each expert's centroids at its warm-up images' mean).

    python studies/routing-embedding/routing_embedding_probe.py builtin mc-shape,mc-corner-fixed shape,colour
    python studies/routing-embedding/routing_embedding_probe.py /tmp/pair2/benchmark.yaml light,dark
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from cramcl.backbones.tiny.vision import load_image_tensor
from cramcl.config import resolve_config
from cramcl.engine.session import open_session

SINGLE_BLOCKS = (1, 3, 5, 8, 11, 15)
SIGMA = 0.25


def normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


@torch.no_grad()
def pooled_outputs(net, records, image_size: int) -> dict[str, torch.Tensor]:
    """name -> (N, C): final features mean- and max-pooled, and single blocks mean-pooled."""
    caught, out = {}, {}
    hooks = [net._blocks[b].register_forward_hook(lambda _m, _i, o, b=b: caught.__setitem__(b, o))
             for b in SINGLE_BLOCKS]
    try:
        for start in range(0, len(records), 16):
            x = torch.stack([load_image_tensor(r.image, image_size) for r in records[start:start + 16]])
            final = net.extract_features(x)
            parts = {"final": final.mean((2, 3)), "final_maxpool": final.amax((2, 3)),
                     **{f"block{b}": caught[b].mean((2, 3)) for b in SINGLE_BLOCKS}}
            for name, value in parts.items():
                out.setdefault(name, []).append(value)
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(values).double() for name, values in out.items()}


CANDIDATES = {
    **{name: (lambda d, name=name: normalize(d[name])) for name in
       ("final", "final_maxpool", *(f"block{b}" for b in SINGLE_BLOCKS))},
    # what method.image_feature_blocks=[b] builds: each part normalised, the whole scaled back to unit norm
    **{f"final+block{b}": (lambda d, b=b: torch.cat([normalize(d["final"]), normalize(d[f"block{b}"])], -1) / 2 ** 0.5)
       for b in (3, 5)},
}


def main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="How well candidate routing image embeddings separate the tasks of "
                                 "a group, before any training.")
    ap.add_argument("benchmark", help="'builtin' (the built-in stream) or a benchmark.yaml")
    ap.add_argument("groups", nargs="+", metavar="TASK,TASK", help="a group of tasks, comma-separated")
    args = ap.parse_args(argv)
    benchmark = None if args.benchmark == "builtin" else args.benchmark
    groups = [g.split(",") for g in args.groups]
    torch.set_num_threads(1)
    cfg = resolve_config(method="cram", profile="default", benchmark=benchmark, overrides=[])
    session = open_session(cfg, Path(tempfile.mkdtemp()), log=lambda *a: None)
    tasks = {t.name: t for t in session.bench.tasks}
    net, size = session.backbone.vision.net, cfg.backbone.image_size
    for group in groups:
        train = {n: pooled_outputs(net, list(tasks[n].train), size) for n in group}
        test = {n: pooled_outputs(net, list(tasks[n].test), size) for n in group}
        for name, embed in CANDIDATES.items():
            tr = {n: embed(train[n]) for n in group}
            te = {n: embed(test[n]) for n in group}
            means = torch.stack([tr[n].mean(0) for n in group])  # (K, D)
            d_means = (means[:, None] - means[None]).pow(2).sum(-1)
            gap = d_means[~torch.eye(len(group), dtype=torch.bool)].min()
            spread = sum((tr[n] - means[k]).pow(2).sum(-1).mean() for k, n in enumerate(group)) / len(group)
            acc, own = [], []
            for k, n in enumerate(group):
                d2 = (te[n][:, None] - means[None]).pow(2).sum(-1)  # (N, K)
                acc.append(float((d2.argmin(1) == k).double().mean()))
                own.append(float(torch.softmax(-d2 / (2 * SIGMA ** 2 * gap), 1)[:, k].mean()))
            print(f"{'/'.join(group):26s} {name:15s} gap {float(gap):.3f} spread {float(spread):.3f}  acc "
                  + " ".join(f"{a:.3f}" for a in acc) + "  own w " + " ".join(f"{o:.3f}" for o in own), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
