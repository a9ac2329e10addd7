"""Placeholder: the scorer registry names (replaced by the full module)."""
SCORER_NAMES = ("exact", "number", "anls", "caption", "bbox_iou")
