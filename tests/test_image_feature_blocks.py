"""``method.image_feature_blocks``: the routing image embedding q with pooled outputs of early vision blocks
beside the final features, each part L2-normalised, then scaled so that q is unit-norm again.

The vision side first (a block's pooled output is its mean over positions, cached next to the image's tokens,
which stay bit-identical, and independent of batch mates), then the embedding, the config checks, and CRAM
driven by hand on the mechanism stream (its centroids and c_buf live in the concatenated space).
"""
from __future__ import annotations

import pytest
import torch

from conftest import random_pngs
from cram_mechanism_stream import drive, open_mechanism_session

torch.set_num_threads(1)


def _vision(cache, monkeypatch):
    from cramcl.backbones.tiny.vision import EfficientNetFeatures

    monkeypatch.setenv("CRAMCL_CACHE", str(cache))
    return EfficientNetFeatures(image_size=64)


# ----------------------------------------------------------------------------------------- vision side
def test_pooled_block_is_the_blocks_mean_output_and_the_tokens_stay_as_cached(tmp_path, monkeypatch):
    from cramcl.backbones.tiny.vision import load_image_tensor

    paths = random_pngs(tmp_path, 3, seed=1)
    vision = _vision(tmp_path / "cache", monkeypatch)
    digests = vision.prepare(paths)
    tokens = vision.features([digests[p] for p in paths]).clone()
    b1, b5 = vision.pooled_block_features(paths, (1, 5))
    assert b1.shape == (3, 24) and b5.shape == (3, 80)

    # reference: the same padded batch through the network, the block outputs caught by hooks of our own
    x = torch.stack([load_image_tensor(p, 64) for p in paths])
    x = torch.cat([x, x[-1:].expand(16 - 3, -1, -1, -1)])
    seen = {}
    hooks = [vision.net._blocks[b].register_forward_hook(lambda _m, _i, out, b=b: seen.__setitem__(b, out))
             for b in (1, 5)]
    with torch.no_grad():
        vision.net.extract_features(x)
    for h in hooks:
        h.remove()
    assert torch.allclose(b1, seen[1][:3].mean((2, 3)), atol=1e-6)
    assert torch.allclose(b5, seen[5][:3].mean((2, 3)), atol=1e-6)
    assert not torch.allclose(b5, seen[5][:3].amax((2, 3)), atol=1e-3)

    # a fresh process reads both from the cache: no forward, and the tokens are the ones cached first
    again = _vision(tmp_path / "cache", monkeypatch)
    again_digests = again.prepare(paths)

    def no_forward(*_a, **_k):
        raise AssertionError("cached block features were recomputed")

    monkeypatch.setattr(again, "_forward", no_forward)
    assert torch.equal(again.features([again_digests[p] for p in paths]), tokens)
    c1, c5 = again.pooled_block_features(paths, (1, 5))
    assert torch.equal(c1, b1) and torch.equal(c5, b5)


def test_a_pooled_block_does_not_depend_on_its_batch_mates(tmp_path, monkeypatch):
    paths = random_pngs(tmp_path, 18, seed=1)
    alone = _vision(tmp_path / "alone", monkeypatch)
    alone.prepare(paths[:1])
    crowd = _vision(tmp_path / "crowd", monkeypatch)
    crowd.prepare(paths)
    # the 1st image alone (a padded batch) against the 17th of 18 (a short second batch)
    first = alone.pooled_block_features(paths[:1], (5,))[0]
    among = crowd.pooled_block_features(paths[1:] + paths[:1], (5,))[0][-1:]
    assert torch.equal(first, among)


def test_blocks_asked_for_in_advance_come_from_the_tokens_forward(tmp_path, monkeypatch):
    """A routing encoder registers its blocks before the run encodes its images: one forward per image gives
    tokens and pooled blocks, equal to what a later, separate pass computes."""
    paths = random_pngs(tmp_path, 3, seed=1)
    later = _vision(tmp_path / "later", monkeypatch)
    later.prepare(paths)
    want = later.pooled_block_features(paths, (5,))[0]
    ahead = _vision(tmp_path / "ahead", monkeypatch)
    ahead.pooled_blocks = (5,)
    calls = []
    forward = ahead._forward
    monkeypatch.setattr(ahead, "_forward", lambda p, blocks: calls.append(blocks) or forward(p, blocks))
    ahead.prepare(paths)
    assert torch.equal(ahead.pooled_block_features(paths, (5,))[0], want)
    assert calls == [(5,)]  # the tokens' forward, nothing after it
    digests = [later._digest_of[p] for p in paths]
    assert torch.equal(ahead.features(digests), later.features(digests))  # hooks leave the tokens alone
    reread = _vision(tmp_path / "ahead", monkeypatch)  # and both went to the cache file
    reread.prepare(paths)
    monkeypatch.setattr(reread, "_forward", lambda *_a: pytest.fail("pooled block not cached with the tokens"))
    assert torch.equal(reread.pooled_block_features(paths, (5,))[0], want)


# ----------------------------------------------------------------------------------------- the embedding
class _FakeBackbone:
    """pooled_image_features / pooled_block_features with fixed values (two images)."""

    final = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])
    block = torch.tensor([[1.0, 1.0], [0.0, -5.0]])

    def pooled_image_features(self, records):
        return self.final[: len(records)]

    def keep_pooled_blocks(self, blocks):
        self.kept = blocks

    def pooled_block_features(self, records, blocks):
        assert blocks == (5,)
        return [self.block[: len(records)]]


def test_q_concatenates_the_normalised_parts_scaled_back_to_unit_norm():
    from cramcl.encoders import RoutingEncoders

    fake = _FakeBackbone()
    records = [object(), object()]
    q = RoutingEncoders(fake, image_feature_blocks=[5]).image_embeddings(records)
    f = torch.nn.functional.normalize(fake.final, dim=-1)
    b = torch.nn.functional.normalize(fake.block, dim=-1)
    assert torch.allclose(q, torch.cat([f, b], -1) / 2 ** 0.5, atol=1e-7)
    assert torch.allclose(q.norm(dim=-1), torch.ones(2), atol=1e-6)
    assert fake.kept == (5,)  # told the backbone, so that images encoded later pool block 5 in the same pass
    raw = RoutingEncoders(fake, normalize=False, image_feature_blocks=[5]).image_embeddings(records)
    assert torch.equal(raw, torch.cat([fake.final, fake.block], -1))
    # without blocks: the final features alone, as before
    assert torch.allclose(RoutingEncoders(fake).image_embeddings(records), f, atol=1e-7)


def test_blocks_need_the_tiny_backbones_encoder():
    from cramcl.encoders import RoutingEncoders
    from cramcl.errors import BadInputError

    class NoBlocks:
        def pooled_image_features(self, records):
            return torch.ones(len(records), 3)

    with pytest.raises(BadInputError, match="image_feature_blocks"):
        RoutingEncoders(NoBlocks(), image_feature_blocks=[5])
    assert RoutingEncoders(NoBlocks()).blocks == ()


@pytest.mark.parametrize("blocks, ok", [("[5]", True), ("[1, 5]", True), ("[]", True), ("[16]", False),
                                        ("[-1]", False), ("[5, 5]", False), ("5", False)])
def test_block_indices_are_checked(blocks, ok):
    """Through the resolved config (every config class of the method checks its own fields)."""
    from cramcl.config import resolve_config
    from cramcl.errors import BadInputError

    for method in ("cram", "same"):
        override = [f"method.image_feature_blocks={blocks}"]
        if ok:
            resolve_config(method=method, profile="quick", overrides=override)
        else:
            wanted = "image_feature_blocks: (.* distinct block indices in|expected a list)"
            with pytest.raises(BadInputError, match=wanted):
                resolve_config(method=method, profile="quick", overrides=override)


def test_blocks_with_an_hf_backbone_or_clip_are_a_config_error(tmp_path):
    from cramcl.config import resolve_config
    from cramcl.errors import BadInputError

    for extra in (["backbone.name=hf", f"backbone.model_path={tmp_path}"], [f"method.image_encoder={tmp_path}"]):
        with pytest.raises(BadInputError, match="image_feature_blocks"):
            resolve_config(method="cram", profile="quick", overrides=["method.image_feature_blocks=[5]", *extra])
    resolve_config(method="cram", profile="quick", overrides=["method.image_feature_blocks=[5]"])
    # the default profile (the embedded backbone's) sets [5]; a real model's --config file empties it
    from cramcl.config import CONFIG_DIR

    for path in sorted((CONFIG_DIR / "backbones").glob("*.yaml")):
        cfg = resolve_config(method="cram", profile="default", config_file=str(path))
        assert cfg.method_args["image_feature_blocks"] == [], path.name
    assert resolve_config(method="cram", profile="default").method_args["image_feature_blocks"] == [5]


# ----------------------------------------------------------------------------------------- CRAM by hand
def test_cram_routes_in_the_concatenated_space(tmp_path):
    """c_buf and the new expert's centroids are the mean of q = [final, block 5] over the warm-up images."""
    s = open_mechanism_session(tmp_path, ["method.image_feature_blocks=[5]"])
    m = s.method
    torch.manual_seed(0)
    rec = {}
    drive(s, 0, rec)
    q = m.encoders.image_embeddings(rec["warm_records"]).double()
    assert q.shape[1] == 1280 + 80
    final_only = torch.nn.functional.normalize(s.backbone.pooled_image_features(rec["warm_records"]).double(), dim=-1)
    assert torch.allclose(q[:, :1280] * 2 ** 0.5, final_only, atol=1e-6)
    init = rec["centroid_init"].double().cpu()  # (L, D)
    assert init.shape == (m.num_layers, 1360)
    assert torch.allclose(init, q.mean(0).expand_as(init), atol=1e-5)
