"""A run directory's saved settings (``config.yaml``), read back for --resume, eval, predict, export and
every other command that opens an earlier run."""
from __future__ import annotations

from pathlib import Path

import yaml

from cramcl.config import RunConfig, config_from_dict
from cramcl.errors import BadInputError
from cramcl.safe_yaml import YAMLRefused, load_yaml


def load_saved_config(run_dir: Path) -> RunConfig:
    """A run directory's ``config.yaml`` (bad input naming the file when it is missing or damaged)."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        raise BadInputError(f"{saved}: not found; --resume needs the directory of an earlier run")
    try:
        data = load_yaml(saved.read_text(encoding="utf-8"))
    except YAMLRefused as e:
        raise BadInputError(f"{saved}: {e}; the run cannot be resumed") from None
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise BadInputError(f"{saved}: not a readable config ({type(e).__name__}); the run cannot be resumed") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{saved}: not a cramcl config (expected a mapping)")
    return config_from_dict(data, str(saved))
