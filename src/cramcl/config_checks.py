"""What each setting accepts: the named choices, the numeric ranges, and the method's own checks, all run on a
resolved config before anything is built or written; every problem is one line naming the setting and the
file (or command line) that set it."""
from __future__ import annotations

from cramcl.engine.budget import budget_problems
from cramcl.errors import BadInputError
from cramcl.methods.registry import method_config_class

#: ``backbone.base_path: builtin`` (the default profile's): the tiny backbone's base shipped for the built-in
#: stream (backbones/tiny/saved_base.py); it means nothing to a real model, so it is not an error there.
SHIPPED_BASE = "builtin"

CHOICES = {("train", "scheduler"): ("cosine", "constant"), ("train", "eval_batches"): ("mixed", "per_task"),
           ("train", "nonfinite"): ("stop", "skip"), ("data", "builtin_stream"): ("main", "related"),
           ("train", "mixed_precision"): ("no", "bf16", "fp16")}


# (section, key) -> (lowest allowed, highest allowed, whether the bounds are inclusive); None = unbounded
RANGES = {("train", "steps_per_task"): (1, None), ("train", "epochs_per_task"): (0, None, False), ("train", "batch_size"): (1, None), ("train", "grad_accum"): (1, None),
          ("train", "lr"): (0, None, False), ("train", "weight_decay"): (0, None), ("train", "warmup_ratio"): (0, 1),
          ("train", "grad_clip"): (0, None), ("train", "eval_batch_size"): (1, None), ("train", "log_every"): (1, None),
          ("train", "progress_seconds"): (0, None, False), ("train", "step_checkpoint_every"): (0, None),
          ("data", "builtin_n_train"): (1, None), ("data", "builtin_n_test"): (1, None), ("data", "builtin_seed"): (0, None),
          ("data", "max_train_per_task"): (1, None), ("data", "max_test_per_task"): (1, None),
          # base_steps >= 1: the base stage's schedule divides by it, and an untrained base answers nothing
          ("backbone", "base_steps"): (1, None), ("backbone", "base_batch_size"): (1, None),
          ("backbone", "base_lr"): (0, None, False), ("backbone", "max_new_tokens"): (1, None),
          ("backbone", "image_size"): (16, None), ("backbone", "max_length"): (8, None), ("backbone", "base_seed"): (0, None),
          ("backbone", "hidden_size"): (8, None), ("backbone", "num_layers"): (1, None), ("backbone", "num_heads"): (1, None),
          ("backbone", "intermediate_size"): (1, None),
          ("backbone", "base_first_steps"): (0, None), ("backbone", "base_first_lr"): (0, None, False),
          ("backbone", "base_first_warmup"): (0, None)}

#: every RNG a run seeds takes it (NumPy's needs < 2**32), and seed * 1000 + task index stays in 64 bits
MAX_SEED = 2**31 - 1
_SEED = "every RNG a run seeds must take it"
_BATCH = "per device: more samples than any accelerator's memory holds for a multimodal model"
_STEPS = "steps of one stage: a year at several steps a second"
_TINY = "the tiny model's sizes: far beyond what it is for, yet buildable on a CPU"
# (section or None for top level, key) -> (the largest value no real use exceeds, why): a larger one is a typo
# that would otherwise run out of memory or time deep inside a run instead of being named here
CAPS = {(None, "seed"): (MAX_SEED, _SEED), ("data", "builtin_seed"): (MAX_SEED, _SEED),
        ("backbone", "base_seed"): (MAX_SEED, _SEED),
        ("train", "batch_size"): (4096, _BATCH), ("train", "eval_batch_size"): (4096, _BATCH),
        ("backbone", "base_batch_size"): (4096, _BATCH), ("train", "grad_accum"): (4096, "micro-batches per step"),
        ("train", "steps_per_task"): (10_000_000, _STEPS), ("backbone", "base_steps"): (10_000_000, _STEPS),
        ("backbone", "base_first_steps"): (10_000_000, _STEPS), ("backbone", "base_first_warmup"): (10_000_000, _STEPS),
        ("data", "builtin_n_train"): (100_000, "records per task, generated into the cache as images"),
        ("data", "builtin_n_test"): (100_000, "records per task, generated into the cache as images"),
        ("backbone", "image_size"): (1024, "the tiny backbone's EfficientNet gives (image_size / 32)**2 image tokens"),
        ("backbone", "max_new_tokens"): (4096, "tokens of one answer"),
        ("backbone", "hidden_size"): (8192, _TINY), ("backbone", "num_layers"): (64, _TINY),
        ("backbone", "num_heads"): (128, _TINY), ("backbone", "intermediate_size"): (65536, _TINY)}


def _out_of_range(value, bounds) -> bool:
    lo, hi, inclusive = (*bounds, True) if len(bounds) == 2 else bounds
    if value is None:
        return False
    if lo is not None and (value < lo if inclusive else value <= lo):
        return True
    return hi is not None and value > hi


def check_choices(cfg, where: str, origins: dict[str, str] | None = None) -> None:
    """Settings that take one of a few names or lie in a range, and the method's own checks: anything else is
    bad input naming the setting and what it accepts (before anything is built or written). ``origins`` maps a
    setting ("train.lr") to the layer that set it (a --config file, "command line"), named instead of ``where``."""
    origins = origins or {}

    def at(name: str) -> str:
        return origins.get(name, where)

    problems = []
    for (section, key), valid in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in valid:
            problems.append(f"{at(f'{section}.{key}')}: {section}.{key}: '{value}' is not one of {', '.join(valid)}")
    workers = cfg.train.loader_workers
    if not (workers == "auto" or (isinstance(workers, int) and workers >= 0)):
        problems.append(f"{at('train.loader_workers')}: train.loader_workers: {workers!r} must be auto or a count >= 0")
    if cfg.backbone.base_path not in ("", SHIPPED_BASE) and cfg.backbone.name != "tiny":
        problems.append(f"{at('backbone.base_path')}: backbone.base_path: a saved base is for the tiny backbone only "
                        f"(backbone.name is '{cfg.backbone.name}'; a real model is loaded from backbone.model_path)")
    for (section, key), bounds in RANGES.items():
        value = getattr(getattr(cfg, section), key)
        if _out_of_range(value, bounds):
            lo, hi = bounds[0], bounds[1]
            strict = len(bounds) == 3 and not bounds[2]
            want = (f"> {lo}" if strict else f">= {lo}") if hi is None else f"in [{lo}, {hi}]"
            problems.append(f"{at(f'{section}.{key}')}: {section}.{key}: {value!r} must be {want}")
    if isinstance(cfg.seed, int) and cfg.seed < 0:
        problems.append(f"{at('seed')}: seed: {cfg.seed} must be >= 0")
    for (section, key), (cap, why) in CAPS.items():
        value = getattr(getattr(cfg, section) if section else cfg, key)
        name = f"{section}.{key}" if section else key
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > cap:
            problems.append(f"{at(name)}: {name}: {value!r} must be <= {cap:,} ({why})")
    heads, hidden = cfg.backbone.num_heads, cfg.backbone.hidden_size
    if cfg.backbone.name == "tiny" and isinstance(heads, int) and heads >= 1 and hidden % heads:
        problems.append(f"{at('backbone.hidden_size')}: backbone.hidden_size: {hidden} is not a multiple of "
                        f"backbone.num_heads ({heads})")
    problems += [f"{where}: {p}" for p in budget_problems(cfg.train)]
    method_cfg = method_config_class(cfg.method)(**cfg.method_args)
    # every class of the method's config checks its own fields (a subclass's problems() need not call super)
    found: list[str] = []
    for klass in type(method_cfg).__mro__:
        if "problems" in vars(klass):
            found += [p for p in klass.problems(method_cfg) if p not in found]
    problems += [f"{at('method.' + p.split(':')[0])}: method.{p}" for p in found]
    least = getattr(method_cfg, "min_steps_per_task", 1)
    steps = cfg.train.steps_per_task
    if cfg.train.epochs_per_task is None and isinstance(steps, int) and 1 <= steps < least:
        problems.append(f"{at('train.steps_per_task')}: train.steps_per_task: {steps} is too few for {cfg.method}, "
                        f"which needs at least {least} steps per task")
    if getattr(method_cfg, "image_feature_blocks", None) and (cfg.backbone.name != "tiny"
                                                              or method_cfg.image_encoder != "backbone"):
        problems.append(f"{at('method.image_feature_blocks')}: method.image_feature_blocks: pooled vision blocks "
                        f"come from the tiny backbone's encoder (backbone.name is '{cfg.backbone.name}', "
                        f"method.image_encoder '{method_cfg.image_encoder}'); set method.image_feature_blocks=[]")
    if problems:
        raise BadInputError(problems)
