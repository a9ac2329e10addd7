"""CRAM's level-2 routing weights on a real-model architecture before and after the routing-scale fix.

A tiny random-weight LLaVA (built from its config, offline) gives the routing image embedding exactly as
`cramcl run --config configs/backbones/llava-1.5-7b.yaml` computes it (the projected image features, mean
pooled, L2-normalised). Two sets of visually different inputs (shapes on light backgrounds, shapes on dark
ones) play two experts of one group: each expert's centroid is its set's mean embedding over 32 images (as
c_buf is), and the weights are measured on 64 other images of each set with the sigma the backbone configs
shipped (2.0, the paper's value for unnormalised CLIP features), 0.25 in the embedding's units, and
what they ship now (0.25 relative to the centroids' gap, `sigma_units: gap`).

    python studies/routing-scale/routing_scale.py            # prints a table and one JSON line
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from cramcl.backbones.hf import HFBackbone, HFOptions
from cramcl.backbones.hf.tiny_models import build_tiny_model
from cramcl.data.records import Record
from cramcl.methods.cram.centroids import centroid_gap, rbf_routing_weights, routing_check

SIGMAS = {"before (paper's 2.0)": 2.0, "0.25 in the embedding's units": 0.25, "now (0.25, gap units)": "gap"}


def _images(root: Path, kind: str, n: int, offset: int) -> list[Record]:
    g = torch.Generator().manual_seed({"light": 1, "dark": 2}[kind] * 10000 + offset)
    out = []
    for i in range(n):
        light = kind == "light"
        bg = tuple(int(v) for v in (torch.randint(200, 256, (3,), generator=g) if light
                                    else torch.randint(0, 56, (3,), generator=g)))
        fg = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=g))
        im = Image.new("RGB", (32, 32), bg)
        a, b = sorted(int(v) for v in torch.randint(4, 28, (2,), generator=g))
        (ImageDraw.Draw(im).ellipse if i % 2 else ImageDraw.Draw(im).rectangle)([a, a, b + 2, b + 2], fill=fg)
        path = root / f"{kind}-{offset + i}.png"
        im.save(path)
        out.append(Record(id=path.stem, image=path, question="What shape is shown?", answer="circle"))
    return out


def main() -> int:
    import argparse

    argparse.ArgumentParser(description="CRAM's level-2 routing weights on a tiny random-weight LLaVA, for each "
                            "sigma setting; no arguments (prints a table and one JSON line)").parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_model("llava", tmp / "llava")
        backbone = HFBackbone(HFOptions(model_path=str(model)), log=lambda *a: None)
        sets = {kind: (_images(tmp, kind, 32, 0), _images(tmp, kind, 64, 1000)) for kind in ("light", "dark")}

        def embed(records):
            return torch.nn.functional.normalize(backbone.pooled_image_features(records).float(), dim=-1)

        centroids = torch.stack([embed(warm).mean(0) for warm, _ in sets.values()])  # (2, D): c_buf per set
        held_out = {kind: embed(test) for kind, (_, test) in sets.items()}
        rows = {}
        gap = float(centroid_gap(centroids))
        for label, sigma in SIGMAS.items():
            sigma = 0.25 * gap ** 0.5 if sigma == "gap" else sigma  # sigma_eff of sigma_units=gap
            own = {kind: float(rbf_routing_weights(q, centroids, sigma)[:, e].mean())
                   for e, (kind, q) in enumerate(held_out.items())}
            check = routing_check(held_out["dark"], centroids, own=1, sigma=sigma)
            rows[label] = {"sigma": sigma, "own_weight": own, "near_uniform_warning": check["near_uniform"],
                           "nearest_own_centroid": check["separable"], "median_gap": check["gap"],
                           "sigma_for_0_9": check["sigma_for_0_9"]}
    print("tiny random-weight LLaVA (configs/backbones/llava-1.5-7b.yaml's routing embedding), two experts:")
    print(f"{'sigma':<32} {'light->own':>10} {'dark->own':>10} {'nearest own':>12} {'warning':>8}")
    for label, r in rows.items():
        print(f"{label:<32} {r['own_weight']['light']:>10.3f} {r['own_weight']['dark']:>10.3f} "
              f"{100 * r['nearest_own_centroid']:>11.0f}% {('yes' if r['near_uniform_warning'] else 'no'):>8}")
    print(json.dumps({"bench": "routing_scale", "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
