"""Continual metrics on hand-computed matrices (the arithmetic is in the comments)."""
import json
import math
from statistics import mean

import numpy as np
import pytest

from cramcl.errors import BadInputError
from cramcl.eval.metrics import (bwt, continual_metrics, forgetting, gap_to_reference, json_safe,
                                 last_evaluated_row, maa, mfn, mft)

N = None

# 3 tasks. A[0][1] = 99 is a zero-shot look at a future task: no metric may use it.
A3 = [[80, 99, N],
      [95, 90, N],
      [50, 70, 85]]


def test_3x3():
    assert mft(A3) == pytest.approx((80 + 90 + 85) / 3)  # 85
    assert mfn(A3) == pytest.approx((50 + 70 + 85) / 3)  # 68.333
    # rows: 80; (95 + 90) / 2 = 92.5; 68.333 -> (80 + 92.5 + 68.333) / 3 = 80.2778
    assert maa(A3) == pytest.approx((80 + 92.5 + 205 / 3) / 3)
    # ((50 - 80) + (70 - 90)) / 2 = -25
    assert bwt(A3) == pytest.approx(-25.0)
    # i=0: max(80, 95) - 50 = 45; i=1: max over l in [1, 1] = 90 - 70 = 20 (A[0][1] = 99 excluded)
    # -> (45 + 20) / 2 = 32.5
    assert forgetting(A3) == pytest.approx(32.5)


# 4 tasks with unevaluated cells inside the lower triangle.
A4 = [[70, 10, N, N],
      [72, 80, N, N],
      [N, 75, 90, N],   # A[2][0] not evaluated
      [40, N, 88, 95]]  # A[3][1] not evaluated


def test_4x4_with_none_cells():
    m = continual_metrics(A4)
    assert set(m) == {"MFT", "MFN", "MAA", "BWT", "forgetting"}
    assert m["MFT"] == pytest.approx((70 + 80 + 90 + 95) / 4)  # 83.75
    assert m["MFN"] == pytest.approx((40 + 88 + 95) / 3)  # 74.333, A[3][1] skipped
    # rows: 70; (72 + 80) / 2 = 76; (75 + 90) / 2 = 82.5; 223 / 3 -> mean = 75.7083
    assert m["MAA"] == pytest.approx((70 + 76 + 82.5 + 223 / 3) / 4)
    # i=0: 40 - 70 = -30; i=1: final missing, skipped; i=2: 88 - 90 = -2 -> -16
    assert m["BWT"] == pytest.approx(-16.0)
    # i=0: max(70, 72, [missing]) - 40 = 32; i=1 skipped; i=2: 90 - 88 = 2 -> 17
    assert m["forgetting"] == pytest.approx(17.0)


def test_partially_run_stream_uses_last_evaluated_row():
    part = [[80, N, N, N],
            [60, 90, N, N],
            [N, N, N, N],
            [N, N, N, N]]
    assert last_evaluated_row(part) == 1
    expected = {"MFT": 85.0,          # (80 + 90) / 2
                "MFN": 75.0,          # row 1: (60 + 90) / 2
                "MAA": 77.5,          # (80 + 75) / 2
                "BWT": -20.0,         # 60 - 80
                "forgetting": 20.0}   # max(80) - 60
    assert continual_metrics(part) == pytest.approx(expected)
    # the same stream stored with only its evaluated rows
    assert continual_metrics(part[:2]) == pytest.approx(expected)


def test_nan_cells_count_as_unevaluated():
    a = [[80, math.nan], [math.nan, 90]]
    # diagonal 80, 90; last row only 90 (i <= 1); BWT needs A[1][0] -> NaN
    assert mft(a) == 85.0 and mfn(a) == 90.0 and maa(a) == 85.0
    assert math.isnan(bwt(a)) and math.isnan(forgetting(a))


def test_single_task_and_empty():
    m = continual_metrics([[50.0]])
    assert (m["MFT"], m["MFN"], m["MAA"]) == (50.0, 50.0, 50.0)
    assert math.isnan(m["BWT"]) and math.isnan(m["forgetting"])
    empty = continual_metrics([[N, N], [N, N]])
    assert all(math.isnan(v) for v in empty.values())
    assert all(math.isnan(v) for v in continual_metrics([]).values())


def test_bad_shape():
    with pytest.raises(BadInputError, match="T x T"):
        mft([[1, 2], [3]])
    with pytest.raises(BadInputError, match="T x T"):
        mft([[1], [2]])  # more rows than tasks


def test_json_safe():
    d = {"a": math.nan, "b": [1.5, math.inf], "c": {"d": -math.inf, "e": 2}, "f": "x"}
    assert json_safe(d) == {"a": None, "b": [1.5, None], "c": {"d": None, "e": 2}, "f": "x"}
    assert json_safe([np.float32("nan"), np.float64(2.5)]) == [None, 2.5]
    assert type(json_safe(np.float64(2.5))) is float
    text = json.dumps(json_safe(continual_metrics([[50.0]])), allow_nan=False)
    assert json.loads(text)["BWT"] is None


def test_gap_to_reference_splits_into_plasticity_and_forgetting():
    A = [[80, None, None],
         [70, 60, None],
         [50, 55, 90]]
    ref = [90, 70, 95]
    g = gap_to_reference(A, ref)
    # plasticity: (90-80, 70-60, 95-90) -> 25/3; forgetting: (80-50, 60-55, 90-90) -> 35/3
    assert g["plasticity"] == pytest.approx(25 / 3)
    assert g["forgetting"] == pytest.approx(35 / 3)
    assert g["gap"] == pytest.approx(mean(ref) - mean(A[-1]))  # exact when every cell exists


def test_gap_to_reference_skips_missing_cells_and_partial_streams():
    A = [[80, None, None],
         [70, None, None],  # task 1 not evaluated after learning it
         [None, None, None]]  # the stream stopped after task 1
    g = gap_to_reference(A, [90, float("nan"), 95])
    assert g == {"gap": pytest.approx(20.0), "plasticity": pytest.approx(10.0), "forgetting": pytest.approx(10.0)}
    assert math.isnan(gap_to_reference([[None]], [50])["gap"])
