"""CRAM's settings (``method.*``), their defaults (the paper's; configs/methods/cram.yaml holds the values a
run starts from) and their range checks. What each setting and ablation switch does: docs/cram.md."""
from __future__ import annotations

from dataclasses import dataclass

from cramcl.encoders import RoutingEncoderConfig
from cramcl.methods.cram.consolidation import ALLOC_UNITS

ROUTING_MODES = ("per_sample", "batch_mean", "uniform", "oracle")
SIGMA_UNITS = ("absolute", "gap")
ROUTING_METRICS = ("euclidean", "standardized")


@dataclass
class CramConfig(RoutingEncoderConfig):
    buffer_rank: int = 48
    buffer_alpha: float = 96.0  # scale alpha / R = 2
    dropout: float = 0.05
    r_min: int = 4
    r_max: int = 9  # 9 on UCIT, 10 on TriGap
    tau_alloc: float = 0.08
    alloc_units: str = "absolute"  # absolute: S > tau_alloc (the paper's) | energy: a share of the update's energy
    tau_novel: float = 0.99
    capability_gap: bool = True  # ablation false: no novelty filter and no projection off the group's history
    fixed_rank: int | None = None  # ablation "adaptive rank off": every expert gets exactly this rank
    warmup_fraction: float = 0.05
    # ablation: no warm-up, so no buffer to consolidate: a fresh expert (rank fixed_rank, else buffer_rank)
    # trains for the whole task
    no_warmup: bool = False
    sigma: float = 0.25
    sigma_units: str = "gap"  # gap: sigma relative to the group's closest centroid pair | absolute (the paper's)
    routing: str = "per_sample"  # per_sample | batch_mean (the authors') | uniform | oracle (analysis only)
    # euclidean (the paper's) | standardized: distances weighted per coordinate by the group's within-task
    # image variance (centroids.standardizing_scale), shrunk towards Euclidean by metric_shrinkage
    routing_metric: str = "euclidean"
    metric_shrinkage: float = 1.0
    grouping: bool = True  # False: one pool (no level 1)
    join_threshold: float = 0.8
    theta: float = 0.1
    max_groups: int = 5  # 5 on UCIT, 10 on TriGap
    group_init_samples: int = 32  # the task's first N samples decide its group
    lambda_orth: float = 1.0
    # the centroids' peak lr; None: train.lr (the paper trains them with the same lr as the experts)
    centroid_lr: float | None = None

    def problems(self) -> list[str]:
        """Settings out of range, one line each (checked when the config is resolved)."""
        checks = [("sigma", self.sigma > 0, "> 0"), ("r_min", 1 <= self.r_min <= self.r_max, "in [1, r_max]"),
                  ("buffer_rank", self.buffer_rank >= 1, ">= 1"), ("tau_alloc", self.tau_alloc >= 0, ">= 0"),
                  ("tau_novel", 0 <= self.tau_novel <= 1, "in [0, 1]"),
                  ("alloc_units", self.alloc_units in ALLOC_UNITS, f"one of {', '.join(ALLOC_UNITS)}"),
                  ("warmup_fraction", 0 <= self.warmup_fraction < 1, "in [0, 1)"), ("theta", self.theta >= 0, ">= 0"),
                  ("join_threshold", -1 <= self.join_threshold <= 1, "in [-1, 1] (a cosine)"),
                  ("max_groups", self.max_groups >= 1, ">= 1"), ("lambda_orth", self.lambda_orth >= 0, ">= 0"),
                  ("group_init_samples", self.group_init_samples >= 1, ">= 1"),
                  ("fixed_rank", self.fixed_rank is None or self.fixed_rank >= 1, "null or >= 1"),
                  ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
                  ("routing", self.routing in ROUTING_MODES, f"one of {', '.join(ROUTING_MODES)}"),
                  ("sigma_units", self.sigma_units in SIGMA_UNITS, f"one of {', '.join(SIGMA_UNITS)}"),
                  ("routing_metric", self.routing_metric in ROUTING_METRICS, f"one of {', '.join(ROUTING_METRICS)}"),
                  ("metric_shrinkage", self.metric_shrinkage > 0, "> 0"),
                  ("centroid_lr", self.centroid_lr is None or self.centroid_lr > 0, "null or > 0")]
        if self.alloc_units == "energy":
            checks.append(("tau_alloc", 0 < self.tau_alloc <= 1, "in (0, 1] with alloc_units energy (a share)"))
        return [f"{name}: {getattr(self, name)!r} must be {want}" for name, ok, want in checks if not ok]

    @property
    def min_steps_per_task(self) -> int:
        """A warm-up step fills c_buf and the buffer, a stable step trains the expert: at least one of each."""
        return 1 if self.no_warmup else 2
