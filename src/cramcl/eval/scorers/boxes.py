"""``bbox_iou``: box grounding scored by intersection over union."""
from __future__ import annotations

import re
from collections.abc import Sequence

from cramcl.errors import BadInputError
from cramcl.eval.scorers._common import Reference, check_inputs, ref_list

BOX_IOU_THRESHOLD = 0.5
_FLOAT_RE = re.compile(r"-?\d+(?:\.\d+)?|-?\.\d+")


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first four numbers of ``text`` as (x1, y1, x2, y2), e.g. "[0.1, 0.2, 0.5, 0.6]"; None if fewer."""
    nums = _FLOAT_RE.findall(str(text))
    if len(nums) < 4:
        return None
    x1, y1, x2, y2 = (float(v) for v in nums[:4])
    return x1, y1, x2, y2


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; corners are sorted first, so a box given
    as (x2, y2, x1, y1) means the same box. Zero-area union -> 0."""
    ax1, ax2 = sorted((a[0], a[2]))
    ay1, ay2 = sorted((a[1], a[3]))
    bx1, bx2 = sorted((b[0], b[2]))
    by1, by2 = sorted((b[1], b[3]))
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def check_box_reference(ref: str, question: str = "") -> str | None:
    """Why ``ref`` cannot be a bbox_iou reference, or None when it parses as a box."""
    return None if parse_box(ref) is not None else f"reference {ref!r} is not a box '[x1, y1, x2, y2]'"


def bbox_iou(predictions: list[str], references: list[Reference], *,
             threshold: float = BOX_IOU_THRESHOLD, **_) -> tuple[float, list[float]]:
    """Box grounding: 100 if IoU(pred, ref) >= threshold (0.5) else 0; an unparsable prediction scores 0.
    An unparsable reference is bad data and raises :class:`BadInputError` naming the record."""
    check_inputs("bbox_iou", predictions, references)
    per = []
    for k, (pred, refs) in enumerate(zip(predictions, references)):
        ref_boxes = []
        for r in ref_list(refs):
            box = parse_box(r)
            if box is None:
                raise BadInputError(f"scorer 'bbox_iou': record {k}: {check_box_reference(r)}")
            ref_boxes.append(box)
        p = parse_box(pred)
        ok = p is not None and any(box_iou(p, b) >= threshold for b in ref_boxes)
        per.append(100.0 if ok else 0.0)
    return sum(per) / len(per), per
