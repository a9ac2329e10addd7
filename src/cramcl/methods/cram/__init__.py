"""CRAM, one file per mechanism (docs/cram.md, "Code map"):

  method.py         the lifecycle: task start, warm-up, consolidation, stable phase, evaluation routing, loss
  groups.py         level 1: instruction groups (prototypes, the join-or-create rule, assignment)
  centroids.py      level 2: per-layer centroids, RBF weights, sigma's gap unit, the routing check, c_buf
  consolidation.py  warm-up buffer SVD, adaptive rank, capability gap (novelty filter, projection)
  penalty.py        the gated orthogonality penalty
  config.py         settings and their range checks
  state.py          checkpoint state and parameter accounting
  report.py         report sections, inspection and routing explanations
"""
from cramcl.methods.cram.config import CramConfig
from cramcl.methods.cram.method import Cram

__all__ = ["Cram", "CramConfig"]
