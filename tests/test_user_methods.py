"""A method of your own in one file: by path, by module, by entry point; the example under examples/ runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import LogSink, quick_config

torch.set_num_threads(1)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nearest_prototype_lora.py"
SPEC = f"{EXAMPLE}:NearestPrototypeLora"


def test_the_example_method_runs_on_the_quick_profile_and_resumes(tmp_path, warm_cache):
    from cramcl.engine.runner import run_stream

    cfg = quick_config(SPEC, ["method.rank=4"])
    assert cfg.method == SPEC and cfg.method_args == {"rank": 4, "alpha": 16.0, "dropout": 0.05}
    out = tmp_path / "run"
    full = run_stream(cfg, out, log=LogSink())
    assert len(full["scores"]) == 3 and all(v is not None for v in full["scores"][-1])
    metrics = json.loads((out / "results" / "metrics.json").read_text())
    assert metrics["params"]["stored_total"] == 3 * metrics["params"]["active_per_sample"]  # one LoRA a task
    cut = tmp_path / "cut"
    run_stream(cfg, cut, log=LogSink(), stop_after_task=1)
    assert run_stream(None, cut, resume=True, log=LogSink()) == full  # prototypes are saved with the state


def test_a_method_by_relative_path_is_stored_absolute(monkeypatch):
    monkeypatch.chdir(EXAMPLE.parents[1])
    cfg = quick_config("examples/nearest_prototype_lora.py:NearestPrototypeLora")
    assert cfg.method == SPEC


def test_a_method_by_module_path_and_by_entry_point(tmp_path, monkeypatch):
    from cramcl.methods.registry import method_config_class, method_names

    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / "my_methods.py").write_text(EXAMPLE.read_text())
    dist = pkg / "my_methods-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-methods\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cramcl.methods]\nprototypes = my_methods:NearestPrototypeLora\n")
    monkeypatch.syspath_prepend(str(pkg))
    assert method_config_class("my_methods:NearestPrototypeLora").__name__ == "NearestPrototypeConfig"
    assert "prototypes" in method_names()
    assert quick_config("prototypes", ["method.rank=2"]).method_args["rank"] == 2
    sys.modules.pop("my_methods", None)


@pytest.mark.parametrize("spec, words", [
    ("nope/missing.py:X", "file not found"),
    (f"{EXAMPLE}:NoSuchClass", "has no Method subclass named 'NoSuchClass'"),
    ("json:JSONDecoder", "has no Method subclass named 'JSONDecoder'"),
    ("no_such_module_xyz:Cls", "cannot import 'no_such_module_xyz'"),
    ("cramm", "did you mean 'cram'"),
])
def test_a_bad_method_spec_is_bad_input(spec, words, capsys):
    from cramcl.cli import main

    assert main(["run", "--method", spec, "--profile", "quick", "--out", "/tmp/never-made"]) == 2
    assert words in capsys.readouterr().err


def test_a_user_file_that_fails_to_import_is_named(tmp_path, capsys):
    from cramcl.cli import main

    bad = tmp_path / "broken.py"
    bad.write_text("raise ValueError('oops')\n")
    assert main(["run", "--method", f"{bad}:M", "--profile", "quick", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: cannot be imported (ValueError: oops)" in err


def test_compare_runs_a_user_method_beside_a_built_in_one(tmp_path, warm_cache):
    from cramcl.engine.compare import run_compare

    from conftest import QUICK_OVERRIDES

    result = run_compare(["lora-ft", f"{SPEC}:rank=4"], tmp_path / "cmp", profile="quick", overrides=QUICK_OVERRIDES,
                         log=LogSink())
    assert [r["method"] for r in result["methods"]] == ["lora-ft", f"{SPEC}:rank=4"]
    assert (tmp_path / "cmp" / "nearest-prototype-lora+rank=4" / "results" / "matrix.json").exists()
    assert "nearest_prototype_lora.py:NearestPrototypeLora:rank=4" in (tmp_path / "cmp" / "compare.md").read_text()


def test_compare_takes_a_user_method_with_settings():
    from cramcl.engine.compare import parse_variant, variant_dir

    assert parse_variant(f"{SPEC}:rank=4") == (SPEC, ["method.rank=4"])
    assert variant_dir(f"{SPEC}:rank=4") == "nearest-prototype-lora+rank=4"
