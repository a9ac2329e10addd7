"""Write the light/dark pair benchmark: ONE instruction over two visual domains with conflicting answers.

Task ``light``: a coloured circle / square / triangle on a light background -> the shape's name.
Task ``dark``:  the same kind of image on a dark background -> the shape's colour (red/green/blue/yellow).
The instruction ("What is shown in the image?") is identical, so CRAM puts both tasks in one group and only
level-2 (image-centroid) routing can keep them apart; a shared adapter (lora-ft) forgets ``light`` entirely.
In L2-normalised pooled EfficientNet features the two domains' means lie only ~0.09 apart (squared
distance), against ~0.57 from a sample to its own mean: the case studies/routing-embedding/README.md measures.

    python studies/routing-embedding/light_dark_pair.py /tmp/pair2 [--train 400 --test 200]
    cramcl run --benchmark /tmp/pair2/benchmark.yaml --profile default --out runs/pair-cram
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 96  # the tiny backbone's image size in the default profile
QUESTION = "What is shown in the image?"
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 230), "yellow": (235, 210, 20)}
SHAPES = ("circle", "square", "triangle")


def _image(rng: np.random.Generator, light: bool) -> tuple[Image.Image, str, str]:
    bg = tuple(int(v) for v in (rng.integers(200, 256, 3) if light else rng.integers(0, 50, 3)))
    im = Image.new("RGB", (SIZE, SIZE), bg)
    draw = ImageDraw.Draw(im)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    ink = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLOURS[colour])
    r = int(rng.integers(18, 34))
    cx, cy = (int(v) for v in rng.integers(r + 2, SIZE - r - 2, 2))
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=ink)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=ink)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=ink)
    return im, shape, colour


def write_pair(out: Path, n_train: int = 400, n_test: int = 200) -> Path:
    lines = []
    for name, seed in (("light", 1), ("dark", 2)):
        (out / "images" / name).mkdir(parents=True, exist_ok=True)
        (out / name).mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        train, test = [], []
        for i in range(n_train + n_test):
            im, shape, colour = _image(rng, light=name == "light")
            answer = shape if name == "light" else colour
            rel = f"{name}/{i}.png"
            im.save(out / "images" / rel)
            if i < n_train:
                train.append({"id": f"{name}-tr{i}", "image": rel, "conversations": [
                    {"from": "human", "value": "<image>\n" + QUESTION}, {"from": "gpt", "value": answer}]})
            else:
                test.append({"id": f"{name}-te{i}", "image": rel, "question": QUESTION, "answer": answer})
        (out / name / "train.json").write_text(json.dumps(train))
        (out / name / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
        lines.append(f"  - {{name: {name}, train: {name}/train.json, test: {name}/test.jsonl, scorer: exact}}")
    path = out / "benchmark.yaml"
    path.write_text("name: light-dark-pair\nimage_root: images\ntasks:\n" + "\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--test", type=int, default=200)
    a = ap.parse_args()
    print(write_pair(a.out, a.train, a.test))
