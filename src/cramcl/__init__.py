"""cramcl: multimodal continual instruction tuning with CRAM and the field's other methods.

The public API (the command line is a thin layer over it): :func:`load_config`, :func:`run`, :func:`resume`,
:func:`compare`, :func:`open_run` (-> :class:`FinishedRun`: ``matrix``, ``metrics``, ``predict``,
``export_peft``); a method of your own subclasses :class:`Method` (see docs/methods.md). Names are imported
on first use, so ``import cramcl`` (and ``cramcl --help``) does not load torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_config": "cramcl.api", "run": "cramcl.api", "resume": "cramcl.api", "compare": "cramcl.api",
    "open_run": "cramcl.api", "FinishedRun": "cramcl.api",
    "Method": "cramcl.methods.base", "Phase": "cramcl.methods.base", "Services": "cramcl.methods.base",
    "BadInputError": "cramcl.errors", "TrainingFault": "cramcl.errors",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cramcl' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
