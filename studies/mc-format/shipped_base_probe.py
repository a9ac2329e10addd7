"""Probe the base a `default`-profile run loads (the shipped one unless ``backbone.base_path=`` says otherwise)
with `studies/mc-format/base_probe.py`'s probe sets, plus one of its own: the generic caption of the `caption` task's
two-shape test images ("Describe the image." -> "two shapes side by side" / "two shapes one above the other",
the base corpus's wording), i.e. whether the base tells the two arrangements apart.

    python studies/mc-format/shipped_base_probe.py [overrides ...]

Greedy answers, exact match; one line per probe set: name, records, accuracy.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from base_probe import accuracy, probe_sets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "caption-relation"))  # relation(): the caption study's


def arrangement_records(bench: Path) -> list:
    from caption_relation import relation

    from cramcl.data.builtin import PRETRAIN_QUESTION
    from cramcl.data.builtin.scenes import ARRANGEMENT
    from cramcl.data.records import Record

    root = (bench / "images").resolve()
    rows = [json.loads(line) for line in (bench / "caption" / "test.jsonl").read_text().splitlines()]
    return [Record(r["id"], root / r["image"], PRETRAIN_QUESTION, ARRANGEMENT[relation(r["answer"])])
            for r in rows if relation(r["answer"])]


def main() -> int:
    ap = argparse.ArgumentParser(description="Probe the base a default-profile run loads (binding, colour MC, "
                                 "the stream's MC tasks zero-shot, the arrangement of two shapes).")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE settings of the run whose base is probed, "
                    "e.g. backbone.base_path=runs/base6")
    args = ap.parse_args()
    from cramcl.backbones import build_backbone
    from cramcl.config import resolve_config
    from cramcl.data.builtin import questions
    from cramcl.data.stream import load_stream

    torch.set_num_threads(1)
    cfg = resolve_config(method="zero-shot", profile="default", overrides=args.overrides)
    stream = load_stream(cfg.data)
    bench = Path(stream.path).parent
    backbone = build_backbone(cfg, stream, log=lambda *_: None)
    sets = {**probe_sets(bench, spaced=True, tail=questions.CHOICE_TAIL), "arrangement": arrangement_records(bench)}
    backbone.model.eval()
    with torch.no_grad():
        for name, records in sets.items():
            backbone.prepare(records)
            print(f"{name}: {len(records)} records, {accuracy(backbone, records)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
