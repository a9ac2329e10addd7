"""``method.centroid_lr``: CRAM's centroids in an optimizer group of their own, and the trainer's check that a
method's optimizer groups hold every trainable parameter exactly once."""
from __future__ import annotations

import pytest
import torch

from conftest import LogSink, quick_config

torch.set_num_threads(1)


class _Groups:
    name = "probe"

    def __init__(self, groups):
        self._groups = groups

    def optimizer_groups(self, lr):
        return self._groups


def test_groups_must_hold_every_trainable_parameter_exactly_once():
    from cramcl.engine.trainer import _checked_groups

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    ok = [{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}, {"params": [], "lr": 5.0}]
    assert [g["lr"] for g in _checked_groups(_Groups(ok), 1.0, [a, b])] == [1.0, 0.1]  # empty groups dropped
    for bad in ([{"params": [a], "lr": 1.0}], [{"params": [a, b], "lr": 1.0}, {"params": [b], "lr": 1.0}]):
        with pytest.raises(RuntimeError, match="exactly once"):
            _checked_groups(_Groups(bad), 1.0, [a, b])


def _stable_session(tmp_path, extra):
    """CRAM after task 0 and inside task 1's stable phase (one pool, so task 1 routes against task 0)."""
    from cramcl.engine.session import open_session
    from cramcl.engine.trainer import train_task

    s = open_session(quick_config("cram", ["method.grouping=false", *extra]), tmp_path, log=LogSink())
    for t in (0, 1):
        task = s.bench.tasks[t]
        s.backbone.prepare(list(task.train))
        s.method.before_task(t, task)
        train_task(s.accelerator, s.backbone, s.method, list(task.train), s.cfg.train, t, seed=t)
        s.method.after_task(t)
    return s


def test_cram_puts_its_centroids_in_a_group_at_centroid_lr_only_when_set():
    from cramcl.methods.cram import Cram, CramConfig

    for centroid_lr, want in ((None, [3e-3]), (1e-3, [3e-3, 1e-3])):
        m = Cram(CramConfig(centroid_lr=centroid_lr))
        m.layers = {}
        m.centroids.add(torch.zeros(4), num_layers=2)
        m.centroids.centroids[0].requires_grad_(True)
        groups = m.optimizer_groups(3e-3)
        assert [g["lr"] for g in groups] == want
        assert groups[-1]["params"][-1] is m.centroids.centroids[0]
    assert any("centroid_lr" in p for p in CramConfig(centroid_lr=0.0).problems())


@pytest.mark.parametrize("centroid_lr, moves", [(None, True), (1e-12, False)])
def test_centroids_train_at_their_own_lr(tmp_path, warm_cache, centroid_lr, moves):
    """The new expert's centroids start at c_buf on every layer (identical rows); the stable phase moves
    them apart at train.lr, and leaves them where they started at a negligible centroid_lr, while the
    expert itself trains either way."""
    extra = [] if centroid_lr is None else [f"method.centroid_lr={centroid_lr}"]
    s = _stable_session(tmp_path, extra)
    c = s.method.centroids.centroids[1].detach()  # (L, D)
    spread = float((c - c[0]).abs().max())
    assert (spread > 1e-5) == moves, spread
    experts_B = [layer.experts_B[1].detach() for layer in s.method.layers.values()]
    assert any(float(B.abs().max()) > 0 for B in experts_B)
