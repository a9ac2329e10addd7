"""Every named peer variant of issue 8 is a `cramcl compare` spec that resolves to the setting it names, and
each method file's defaults are the source's (profiles may choose otherwise, saying why)."""
from __future__ import annotations

import pytest

from cramcl.config import resolve_config
from cramcl.engine.compare import parse_variant


@pytest.mark.parametrize("spec, key, value", [
    ("hide", "fusion", "factors"), ("hide:fusion=products", "fusion", "products"),
    ("hide", "anchor_mixing", "authors"), ("hide:anchor_mixing=same", "anchor_mixing", "same"),
    ("olora", "lambda1", "original"), ("olora:lambda1=mcitlib", "lambda1", "mcitlib"),
    ("olora:lambda1=0.05", "lambda1", 0.05),
    ("replay", "buffer", 0.02), ("replay:buffer=0.1", "buffer", 0.1), ("replay:buffer=500", "buffer", 500),
    ("routing-cl:gate_budget=phatgoose", "gate_budget", "phatgoose"),
    ("routing-cl:gate_budget=ours", "gate_budget", "ours"),
])
def test_variant_specs_resolve_to_their_setting(spec, key, value):
    name, overrides = parse_variant(spec)
    cfg = resolve_config(method=name, profile="default", overrides=overrides)
    assert cfg.method_args[key] == value


def test_method_files_default_to_the_sources_and_the_demo_profiles_say_otherwise_where_they_do():
    paper = {name: resolve_config(method=name, profile="paper").method_args
             for name in ("hide", "olora", "replay", "routing-cl")}
    assert (paper["hide"]["fusion"], paper["hide"]["anchor_mixing"]) == ("factors", "authors")
    assert paper["olora"]["lambda1"] == "original" and paper["routing-cl"]["gate_budget"] == "phatgoose"
    for profile in ("default", "quick"):  # PHATGOOSE's 32 x 100 gate micro-batches are too slow on 2 CPU cores
        assert resolve_config(method="routing-cl", profile=profile).method_args["gate_budget"] == "ours"
