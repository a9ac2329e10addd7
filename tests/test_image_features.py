"""The tiny backbone's cached EfficientNet features: one image, one result, whatever images it was batched with.

The cache is keyed by the image's content alone, so a feature that depended on its batch mates (a short last
batch runs another convolution path, ~3e-5 apart) would make a run's inputs depend on which images an earlier
run happened to encode first."""
from __future__ import annotations

import pytest
import torch

from conftest import random_pngs


def _features(cache, paths, monkeypatch, batch_size=16):
    from cramcl.backbones.tiny.vision import EfficientNetFeatures

    monkeypatch.setenv("CRAMCL_CACHE", str(cache))
    vision = EfficientNetFeatures(image_size=64, batch_size=batch_size)
    digests = vision.prepare(paths)
    return {p: vision.features([digests[p]])[0] for p in paths}


@pytest.mark.parametrize("threads", [1, 2])
def test_an_images_features_do_not_depend_on_its_batch_mates(tmp_path, monkeypatch, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_batch_independence(tmp_path, monkeypatch)
    finally:
        torch.set_num_threads(before)


def _check_batch_independence(tmp_path, monkeypatch):
    paths = random_pngs(tmp_path, 19)
    alone = _features(tmp_path / "cache-alone", paths[:1], monkeypatch)  # a batch of one image (padded)
    crowd = _features(tmp_path / "cache-crowd", paths[1:] + paths[:1], monkeypatch)  # the 19th of 19: a batch of 3
    first = _features(tmp_path / "cache-first", paths, monkeypatch)  # the 1st of a full batch of 16
    assert alone[paths[0]].shape == (4, 1280)  # (64 px / 32)^2 tokens
    assert torch.equal(alone[paths[0]], crowd[paths[0]])
    assert torch.equal(alone[paths[0]], first[paths[0]])
    assert torch.equal(crowd[paths[5]], first[paths[5]])
