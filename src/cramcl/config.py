"""Typed run configuration: dataclasses, YAML layers and ``KEY=VALUE`` overrides.

Resolution order (later wins): dataclass defaults -> ``configs/methods/<method>.yaml`` (the paper's values)
-> ``configs/profiles/<profile>.yaml`` (sizes for this machine, plus per-method adjustments under
``method_overrides``) -> ``--config FILE`` -> ``KEY=VALUE`` overrides. Unknown keys are errors that name the
nearest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cramcl.config_checks import check_choices
from cramcl.errors import BadInputError
from cramcl.methods.registry import is_builtin, method_config_class, normalize_method_name
from cramcl.safe_yaml import YAMLRefused, load_yaml

CONFIG_DIR = Path(__file__).parent / "configs"
PROFILES = ("quick", "default", "paper")  # paper: the CRAM paper's training protocol for real models


@dataclass
class DataConfig:
    benchmark: str | None = None  # a benchmark YAML; None = the built-in stream
    builtin_n_train: int = 800  # records per task in the generated built-in stream
    builtin_n_test: int = 200
    builtin_seed: int = 0
    builtin_stream: str = "main"  # main (11 tasks, 5 formats) | related (tasks that share skills; docs/cram.md)
    validate_images: bool = True  # decode every image of every task before the run directory is made
    tasks: list[str] | None = None  # a subset of task names, in stream order
    max_train_per_task: int | None = None
    max_test_per_task: int | None = None


@dataclass
class BackboneConfig:
    name: str = "tiny"  # tiny (embedded) | hf (a local transformers model: docs/real-models.md)
    image_size: int = 96  # EfficientNet-Lite0 gives 3x3 feature tokens at 96 px
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    base_steps: int = 300  # the base stage that makes the frozen "pretrained" MLLM
    base_batch_size: int = 64
    base_lr: float = 2.0e-3
    base_seed: int = 0  # the base stage's own seed: `seed` (and --seeds) vary the continual part, not the base
    # a first stage on the benchmark's `pretrain_first:` records alone, before the base stage proper (0 = none);
    # the tiny LM learns to read multiple-choice options only this way (docs/profiles.md, "default: base_path")
    base_first_steps: int = 0
    base_first_lr: float = 5.0e-4
    base_first_warmup: int = 300
    # tiny only: a saved base directory (weights + the vocabulary they were trained with; $VARS and ~ expanded)
    # loaded instead of training the base stage, for any stream whose words it holds (backbones/tiny/saved_base.py);
    # `builtin`: the base shipped for the built-in stream (none with a benchmark of one's own)
    base_path: str = ""
    max_new_tokens: int = 12
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # hf only: a local transformers image-text-to-text model ($VARS and ~ expanded; nothing is downloaded)
    model_path: str = ""
    dtype: str = "auto"  # auto (bfloat16 on a GPU, float32 on CPU) | bfloat16 | float16 | float32
    gradient_checkpointing: bool = False
    max_length: int = 2048  # prompt (image tokens included) + answer tokens; longer answers are cut
    attn_implementation: str | None = None  # None: transformers' default (sdpa); e.g. flash_attention_2
    processor_kwargs: dict[str, Any] = field(default_factory=dict)  # every processor call, e.g. image size caps


@dataclass
class TrainConfig:
    steps_per_task: int | None = 100  # optimizer steps per task (the budget every method shares); or null and:
    epochs_per_task: float | None = None  # passes over each task's records (engine/budget.py); one of the two
    batch_size: int = 32  # per device
    grad_accum: int = 1
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"  # cosine | constant
    grad_clip: float = 1.0
    # a NaN/infinite loss or gradient: stop (exit 1, nothing non-finite is checkpointed) or skip that optimizer
    # step (counted in metrics.json as skipped_steps) for runs with occasional spikes. stop keeps the check on
    # the device and reads it every log_every steps, at each phase's end and before any checkpoint (the error
    # names the first bad step); skip must read it every step (one device sync per step)
    nonfinite: str = "stop"
    mixed_precision: str = "no"  # no | bf16 | fp16 (Accelerate)
    eval_batch_size: int = 128
    # mixed: each evaluation shuffles the union of the seen tasks' test records (seeded) so that batches mix
    # tasks, as a deployed model's inputs do; per_task: one task at a time
    eval_batches: str = "mixed"
    log_every: int = 10
    # processes that build batches (image decoding + the model's processor) beside training: auto = 0 for the
    # embedded backbone (its batches read precomputed features), else one per spare CPU, at most 8 (engine/loader.py)
    loader_workers: int | str = "auto"
    progress_seconds: float = 30.0  # when stderr is not a terminal: one progress update per this many seconds
    # a step checkpoint (checkpoints/step/) every N optimizer steps, so an interrupted task resumes mid-task and
    # loses at most N steps; 0 = only after each task. 100: a few minutes lost at most on a 7B model, for one
    # cheap write of the adapters + optimizer state per 100 steps (docs/real-models.md)
    step_checkpoint_every: int = 100


@dataclass
class RunConfig:
    method: str = "cram"
    profile: str = "default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method_args: dict[str, Any] = field(default_factory=dict)  # validated against the method's own dataclass

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- generic dataclass <-> dict with checks
def _nearest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(valid))})"


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a type annotation, converting ints to floats where a float is wanted."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except BadInputError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            if isinstance(value, str):  # KEY=a,b,c on the command line
                value = [v for v in value.split(",") if v]
            else:
                raise BadInputError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise BadInputError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise BadInputError(f"{where}: expected true/false, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and math.isfinite(value):
            return value
        raise BadInputError(f"{where}: expected a number, got {value!r}" + (" (not finite)" if isinstance(value, float) else ""))
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise BadInputError(f"{where}: expected an integer, got {value!r}")
    if annotation is str:
        if value is None:  # `KEY=` on the command line or an empty YAML value (`backbone.base_path=`: none)
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise BadInputError(f"{where}: expected a string, got {value!r}")
    return value


def update_dataclass(obj: Any, values: dict, where: str, _prefix: str = "") -> None:
    """Set fields of ``obj`` from ``values`` (nested dataclasses recurse); unknown keys are errors.

    ``where`` names the layer (a file, "command line"); each problem reads ``<where>: <section.key>: <why>``."""
    hints = typing.get_type_hints(type(obj))
    valid = [f.name for f in dataclasses.fields(obj)]
    problems = []
    section = f"{where}: {_prefix[:-1]}" if _prefix else where
    for key, value in values.items():
        if key not in valid:
            problems.append(f"{section}: unknown key '{key}'{_nearest(str(key), valid)}")
            continue
        current = getattr(obj, key)
        try:
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise BadInputError(f"{where}: {_prefix}{key}: expected a mapping, got {value!r}")
                update_dataclass(current, value, where, f"{_prefix}{key}.")
            else:
                setattr(obj, key, _coerce(value, hints[key], f"{where}: {_prefix}{key}"))
        except BadInputError as e:
            problems.extend(e.problems)
    if problems:
        raise BadInputError(problems)


def _read_yaml(path: Path) -> dict:
    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except YAMLRefused as e:
        raise BadInputError(f"{path}: {e}") from None
    except FileNotFoundError:
        raise BadInputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise BadInputError(f"{path}: is a directory, not a settings file") from None
    except UnicodeDecodeError as e:
        raise BadInputError(f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise BadInputError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: expected a mapping at the top level")
    return data


def parse_overrides(pairs: list[str]) -> dict:
    """``["train.lr=3e-4", "method=cram", "method.sigma=0.5"]`` -> nested dict; values parsed as YAML scalars.

    A name and settings may share a key: ``method=cram`` with ``method.sigma=0.5`` gives
    ``{"method": {"name": "cram", "sigma": 0.5}}``."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise BadInputError(f"command line: '{pair}' is not KEY=VALUE")
        key, raw = pair.split("=", 1)
        try:
            value = load_yaml(raw) if raw != "" else None
        except YAMLRefused as e:
            raise BadInputError(f"command line: {key}: {e}") from None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if part in node and not isinstance(node[part], dict):
                node[part] = {"name": node[part]}
            node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node.get(last), dict) and not isinstance(value, dict):
            node[last]["name"] = value
        else:
            node[last] = value
    return out


def _split_method(layer: dict, where: str) -> tuple[str | None, dict]:
    """Take the method name and settings out of a layer: ``method: NAME``, ``method: {name: NAME, k: v}``,
    ``method: {k: v}`` or ``method_args: {k: v}`` (the form a saved config.yaml uses)."""
    value = layer.pop("method", None)
    args = layer.pop("method_args", None) or {}
    if not isinstance(args, dict):
        raise BadInputError(f"{where}: method_args must be a mapping")
    name = None
    if isinstance(value, dict):
        value = dict(value)
        name = value.pop("name", None)
        args = {**args, **value}
    elif value is not None:
        name = value
    if name is not None and not isinstance(name, str):
        raise BadInputError(f"{where}: method must be a name, got {name!r}")
    return name, args


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_config(*, method: str | None = None, profile: str | None = None, config_file: str | None = None,
                   benchmark: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Build the fully resolved config from every layer (see the module docstring)."""
    user = _read_yaml(Path(config_file)) if config_file else {}
    cli = parse_overrides(list(overrides))
    user_name, user_args = _split_method(user, str(config_file))
    # a flag wins over the file, but a file naming no valid profile is still wrong (never silently ignored)
    if "profile" in user and (not isinstance(user["profile"], str) or user["profile"] not in PROFILES):
        raise BadInputError(f"{config_file}: profile: unknown profile {user['profile']!r}"
                            f"{_nearest(str(user['profile']), list(PROFILES))}")
    cli_name, cli_args = _split_method(cli, "command line")
    # the method and profile may come from any layer; the command line's flags win
    method = normalize_method_name(method or cli_name or user_name or "cram")
    profile = profile or cli.pop("profile", None) or user.pop("profile", None) or "default"
    if not isinstance(profile, str) or profile not in PROFILES:
        raise BadInputError(f"--profile: unknown profile '{profile}'{_nearest(str(profile), list(PROFILES))}")
    cfg_cls = method_config_class(method)  # raises BadInputError for an unknown method
    if user_name and normalize_method_name(user_name) != method:  # overridden by a flag: still a known method?
        try:
            method_config_class(normalize_method_name(user_name))
        except BadInputError as e:
            raise BadInputError([f"{config_file}: {p.replace('--method: ', 'method: ', 1)}" for p in e.problems]) from None

    layers: list[tuple[str, dict, dict]] = []  # (where, run settings, method settings)
    method_yaml = CONFIG_DIR / "methods" / f"{method}.yaml"
    if is_builtin(method) and method_yaml.exists():
        layers.append((str(method_yaml), {}, _read_yaml(method_yaml)))
    prof = _read_yaml(CONFIG_DIR / "profiles" / f"{profile}.yaml")
    method_overrides = prof.pop("method_overrides", {}) or {}
    layers.append((f"profile {profile}", prof, method_overrides.get(method) or {}))
    if config_file:
        # a --config file may carry per-method settings like a profile (e.g. a backbone file's paper values)
        user_overrides = user.pop("method_overrides", None) or {}
        layers.append((str(config_file), user, {**(user_overrides.get(method) or {}), **user_args}))
    layers.append(("command line", cli, cli_args))

    cfg = RunConfig(method=method, profile=profile)
    return apply_layers(cfg, cfg_cls(), layers, benchmark)


def apply_layers(cfg: RunConfig, method_cfg, layers: list[tuple[str, dict, dict]], benchmark: str | None) -> RunConfig:
    """Apply (where, run settings, method settings) layers in order onto ``cfg`` and its method's config
    dataclass; every problem of every layer is reported at once. Returns ``cfg``, checked."""
    problems = []
    origins: dict[str, str] = {}  # "train.lr" / "method.rank" -> the last layer that set it (named in range errors)
    for where, run_values, method_values in layers:
        run_values = {k: v for k, v in run_values.items() if k not in ("profile", "method_overrides")}
        for section, values in run_values.items():
            if not isinstance(values, dict):  # a top-level setting (seed)
                origins[section] = where
            for key in (values if isinstance(values, dict) else {}):
                origins[f"{section}.{key}"] = where
        for key in method_values:
            origins[f"method.{key}"] = where
        for target, values, label in ((cfg, run_values, where), (method_cfg, method_values, f"{where}: method")):
            try:
                update_dataclass(target, values, label)
            except BadInputError as e:
                problems.extend(e.problems)
    if problems:
        raise BadInputError(problems)
    if benchmark:
        cfg.data.benchmark = str(Path(benchmark).resolve())
    cfg.method_args = dataclasses.asdict(method_cfg)
    check_choices(cfg, "settings", origins)
    return cfg


def config_from_dict(data: dict, where: str = "config.yaml") -> RunConfig:
    """Rebuild a RunConfig from a saved ``config.yaml`` (used by ``--resume`` and ``cramcl eval``)."""
    data = dict(data)
    method_args = data.pop("method_args", {}) or {}
    cfg = RunConfig()
    update_dataclass(cfg, data, where)
    method_cfg = method_config_class(cfg.method)()
    update_dataclass(method_cfg, method_args, f"{where}: method_args")
    cfg.method_args = dataclasses.asdict(method_cfg)
    check_choices(cfg, where)
    return cfg
