"""The base stage: a short image-caption pre-training of projector + LM, cached, then frozen.

It turns the random-init tiny model into a "pretrained MLLM" that knows how to look at an image and write
words, but none of the stream's instruction formats. The result is cached under the user cache, keyed by
everything that determines it (model shape, vocabulary, corpus, steps, seed), so it is trained once.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from cramcl.utils.progress import bar as progress_bar

from cramcl.backbones.tiny.vision import cache_root


def base_stage_key(parts: dict) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class FirstStage:
    """A stage trained alone before the base stage proper (``backbone.base_first_*``), same batch size."""
    make_batch: Callable[[list[int]], dict]
    n_records: int
    steps: int
    lr: float
    warmup: int


def load_or_train_base(model: torch.nn.Module, key: str, make_batch, n_records: int, *, steps: int,
                       batch_size: int, lr: float, seed: int, log=print, first: FirstStage | None = None) -> Path:
    """Load cached base weights for ``key`` or train them with ``make_batch(indices) -> dict`` (after
    ``first``, when given) and cache."""
    path = cache_root() / "base" / f"{key}.safetensors"
    if path.exists():
        model.load_state_dict(load_file(str(path)), strict=True)
        return path
    before = f"{first.steps} steps on the first-stage records, then " if first else ""
    log(f"base stage: {before}{steps} steps of image captioning (cached afterwards at {path})")
    with torch.random.fork_rng():  # leave the caller's random state as a cache hit would
        torch.manual_seed(seed)
        if first is not None:
            _train(model, first.make_batch, first.n_records, first.steps, batch_size, first.lr, seed, first.warmup)
        _train(model, make_batch, n_records, steps, batch_size, lr, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    # clone: tied embeddings share storage, which safetensors refuses to save twice
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return path


def _train(model, make_batch, n_records: int, steps: int, batch_size: int, lr: float, seed: int,
           warmup: int | None = None) -> None:
    """AdamW with a linear warm-up (``warmup`` steps, default steps/20) and cosine decay to 0 at ``steps``."""
    rng = random.Random(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20 if warmup is None else warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    order: list[int] = []
    bar = progress_bar(range(steps), desc="base stage", leave=False)
    for _ in bar:
        if len(order) < batch_size:
            perm = list(range(n_records))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch_size], order[batch_size:]
        loss = model(**make_batch(idx)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
