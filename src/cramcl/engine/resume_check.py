"""``cramcl run --resume`` holds the user to the run they asked for.

The settings given with ``--resume`` (``--method``, ``--profile``, ``--config``, ``--benchmark``,
``KEY=VALUE``) are applied on top of the saved ``config.yaml``; every one that changes the saved run is a
difference, and differences are refused (exit 2, one line each). ``--force`` accepts the settings that
cannot change any result already computed (``FORCE_SAFE``) and still refuses the rest.

``config.yaml`` itself is held to the checkpoint: each task checkpoint carries ``settings.json``
(:func:`settings_record`, the resolved settings it was made under, less ``FORCE_SAFE`` and ``NOT_A_CHANGE``),
and a ``config.yaml`` edited since is refused the same way, one line per changed key
(:func:`check_checkpoint_settings`). A checkpoint without the record (made by an earlier cramcl) resumes
unchecked.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

from cramcl.config import RunConfig, _read_yaml, _split_method, apply_layers, parse_overrides
from cramcl.errors import BadInputError
from cramcl.methods.registry import method_config_class

# Settings that only affect how later evaluation batches are cut, how often progress is logged, how often a
# step checkpoint is written or which processes build the batches: scores already in the matrix stay as they
# are (a later evaluation with another batch size may round floats differently; step checkpoints and loader
# workers never change what trains).
FORCE_SAFE = frozenset({"train.eval_batch_size", "train.log_every", "train.progress_seconds",
                        "train.step_checkpoint_every", "train.loader_workers"})
# Settings about checking inputs, not about the run: changed freely on resume (e.g. --no-validate).
NOT_A_CHANGE = frozenset({"data.validate_images"})


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "processor_kwargs":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def asked_config(saved: RunConfig, *, method=None, profile=None, config_file=None, benchmark=None,
                 overrides=()) -> RunConfig:
    """The saved config with the user's ``--resume`` settings applied (unknown keys are errors)."""
    cfg = copy.deepcopy(saved)
    user = _read_yaml(Path(config_file)) if config_file else {}
    cli = parse_overrides(list(overrides))
    user_name, user_args = _split_method(user, str(config_file))
    cli_name, cli_args = _split_method(cli, "command line")
    cfg.method = method or cli_name or user_name or saved.method
    cfg.profile = profile or cli.pop("profile", None) or user.pop("profile", None) or saved.profile
    cls = method_config_class(cfg.method)
    method_cfg = cls(**{k: v for k, v in saved.method_args.items()
                        if k in {f.name for f in dataclasses.fields(cls)}}) if cfg.method == saved.method else cls()
    user_overrides = user.pop("method_overrides", None) or {}
    layers = [(str(config_file), user, {**(user_overrides.get(cfg.method) or {}), **user_args}),
              ("command line", cli, cli_args)]
    return apply_layers(cfg, method_cfg, layers, benchmark)


def resume_differences(saved: RunConfig, asked: RunConfig) -> list[tuple[str, object, object]]:
    """(key, saved value, asked value) for every setting that differs."""
    a, b = _flatten(saved.to_dict()), _flatten(asked.to_dict())
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resume(saved: RunConfig, run_dir: Path, force: bool, **asked_settings) -> RunConfig:
    """The config to continue with: the saved one, plus (with ``force``) the force-safe changes asked for.
    Any other difference is refused with one line per setting."""
    asked = asked_config(saved, **asked_settings)
    diffs = resume_differences(saved, asked)
    refused = [d for d in diffs if d[0] not in NOT_A_CHANGE and not (force and d[0] in FORCE_SAFE)]
    if refused:
        lines = [f"{run_dir / 'config.yaml'}: --resume would change {k} from {old!r} to {new!r}; a resumed run keeps "
                 "its settings (start a new run with another --out"
                 + (", or pass --force: this one cannot change computed results)" if k in FORCE_SAFE else ")")
                 for k, old, new in refused]
        raise BadInputError(lines)
    for key, _, value in diffs:  # only force-safe (with --force) and not-a-change ones remain
        section, name = key.split(".", 1)
        setattr(getattr(saved, section), name, value)
    return saved


SETTINGS_FORMAT = "cramcl-settings/1"


def settings_record(cfg: RunConfig) -> dict:
    """``settings.json`` of a checkpoint: every resolved setting that can change a result, by dotted key, and
    the SHA-256 of their canonical JSON (sorted keys, no spaces)."""
    flat = {k: v for k, v in _flatten(cfg.to_dict()).items() if k not in FORCE_SAFE | NOT_A_CHANGE}
    canonical = json.dumps(flat, sort_keys=True, separators=(",", ":"))
    return {"format": SETTINGS_FORMAT, "settings_sha256": hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
            "settings": json.loads(canonical)}


def checkpoint_settings_differences(stored: dict, cfg: RunConfig) -> list[tuple[str, object, object]]:
    """(key, value in the checkpoint, value in ``cfg``) for every setting both know that differs; none when
    the hashes agree. A key only one side knows (a setting added or retired by another cramcl version) is
    not a difference."""
    current = settings_record(cfg)
    if stored.get("settings_sha256") == current["settings_sha256"]:
        return []
    old, new = stored["settings"], current["settings"]
    return [(k, old[k], new[k]) for k in sorted(set(old) & set(new)) if old[k] != new[k]]


def check_checkpoint_settings(cfg: RunConfig, ckpt, run_dir: Path, log=print) -> None:
    """Refuse to resume from ``ckpt`` (engine/checkpoint.py's TaskCheckpoint) when ``config.yaml`` was edited
    after it was made: one line per setting, with both values."""
    stored = ckpt.settings
    if not (isinstance(stored, dict) and stored.get("format") == SETTINGS_FORMAT
            and isinstance(stored.get("settings"), dict)):
        log(f"note: checkpoint {ckpt.path.name} has no settings record (made by an earlier cramcl); config.yaml "
            "is not compared with it")
        return
    diffs = checkpoint_settings_differences(stored, cfg)
    if diffs:
        raise BadInputError([f"{run_dir / 'config.yaml'}: {k}: {old!r} in checkpoint {ckpt.path.name}, {new!r} in "
                             "config.yaml; config.yaml was edited after the checkpoint was made and a resumed run "
                             "keeps its settings (restore the value, or start a new run with another --out)"
                             for k, old, new in diffs])
