"""Method names -> (method class, its config dataclass).

Three sources, in this order:
  * the built-in methods of the contract (``cram``, ``lora-ft``, ...);
  * a user's method by path: ``path/to/file.py:ClassName`` (a file anywhere) or ``package.module:ClassName``
    (anything importable); its config dataclass is ``ClassName.config_class`` (an empty one if absent);
  * methods that installed packages register under the entry-point group ``cramcl.methods``
    (``name = "package.module:ClassName"``), used by their plain name.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from cramcl.errors import BadInputError

ENTRY_POINT_GROUP = "cramcl.methods"

# name -> "module:Class:ConfigClass" (imported lazily so `cramcl --help` stays fast)
_METHODS = {
    "cram": "cramcl.methods.cram:Cram:CramConfig",
    "lora-ft": "cramcl.methods.lora_ft:LoraFT:LoraFTConfig",
    "zero-shot": "cramcl.methods.zero_shot:ZeroShot:ZeroShotConfig",
    "same": "cramcl.methods.same:Same:SameConfig",
    "routing-cl": "cramcl.methods.routing_cl:RoutingCL:RoutingCLConfig",
    "olora": "cramcl.methods.olora:OLora:OLoraConfig",
    "moelora": "cramcl.methods.moelora:MoELora:MoELoraConfig",
    "hide": "cramcl.methods.hide:HiDe:HiDeConfig",
    "replay": "cramcl.methods.replay:Replay:ReplayConfig",
    "mtl": "cramcl.methods.mtl:MultiTask:MultiTaskConfig",
    "oracle-lora": "cramcl.methods.oracle_lora:OracleLora:OracleLoraConfig",
}


@dataclasses.dataclass
class NoSettings:
    """The config of a user method that declares no ``config_class``."""


def method_names() -> list[str]:
    return list(_METHODS) + sorted(_entry_points())


def is_builtin(name: str) -> bool:
    return name in _METHODS


def _entry_points() -> dict[str, str]:
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def normalize_method_name(name: str) -> str:
    """A method by file path is kept with an absolute path, so a resumed run finds it from any directory."""
    target, sep, cls = name.rpartition(":")
    if sep and target.endswith(".py"):
        return f"{Path(target).expanduser().resolve()}:{cls}"
    return name


def _load_from_file(path: str, cls_name: str):
    file = Path(path)
    if not file.is_file():
        raise BadInputError(f"--method: {file}: file not found")
    module_name = "cramcl_user_method_" + hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # the user's file: say which and why, not a traceback from deep inside us
            del sys.modules[module_name]
            raise BadInputError(f"--method: {file}: cannot be imported ({type(e).__name__}: {e})") from None
    return _class_of(sys.modules[module_name], cls_name, str(file))


def _class_of(module, cls_name: str, where: str):
    from cramcl.methods.base import Method

    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise BadInputError(f"--method: {where} has no Method subclass named '{cls_name}'")
    cfg_cls = getattr(cls, "config_class", None) or NoSettings
    if not dataclasses.is_dataclass(cfg_cls):
        raise BadInputError(f"--method: {where}:{cls_name}.config_class must be a dataclass")
    return cls, cfg_cls


def _load_spec(spec: str, where: str):
    target, _, cls_name = spec.rpartition(":")
    if target.endswith(".py"):
        return _load_from_file(target, cls_name)
    try:
        module = importlib.import_module(target)
    except ImportError as e:
        raise BadInputError(f"--method: {where}: cannot import '{target}' ({e})") from None
    return _class_of(module, cls_name, target)


def _resolve(name: str):
    if name in _METHODS:
        module, cls, cfg = _METHODS[name].split(":")
        mod = importlib.import_module(module)
        return getattr(mod, cls), getattr(mod, cfg)
    if ":" in name:
        return _load_spec(name, name)
    plugins = _entry_points()
    if name in plugins:
        return _load_spec(plugins[name], f"entry point '{name}'")
    known = list(_METHODS) + sorted(plugins)
    close = difflib.get_close_matches(name, known, n=1)
    hint = (f" (did you mean '{close[0]}'?)" if close else
            f" (known: {', '.join(known)}; a method of your own is path/to/file.py:ClassName or module:ClassName)")
    raise BadInputError(f"--method: unknown method '{name}'{hint}")


def method_class(name: str):
    return _resolve(name)[0]


def method_config_class(name: str):
    return _resolve(name)[1]


def build_method(name: str, args: dict):
    cls, cfg_cls = _resolve(name)
    return cls(cfg_cls(**args))


def method_label(name: str) -> str:
    """A short name for directories and tables: the built-in name, or the user class's ``name``."""
    if name in _METHODS or ":" not in name:
        return name
    cls = method_class(name)
    return cls.name or cls.__name__.lower()
