"""Method names (as in the contract) -> (method class, its config dataclass)."""
from __future__ import annotations

import difflib
import importlib

from cramcl.errors import BadInputError

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


def method_names() -> list[str]:
    return list(_METHODS)


def _resolve(name: str):
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(_METHODS)})"
        raise BadInputError(f"--method: unknown method '{name}'{hint}")
    module, cls, cfg = _METHODS[name].split(":")
    mod = importlib.import_module(module)
    return getattr(mod, cls), getattr(mod, cfg)


def method_config_class(name: str):
    return _resolve(name)[1]


def build_method(name: str, args: dict):
    cls, cfg_cls = _resolve(name)
    return cls(cfg_cls(**args))
