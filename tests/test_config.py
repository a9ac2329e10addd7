"""The run configuration: unknown keys and wrong types are errors naming the key (with a "did you mean"),
KEY=VALUE overrides parse as YAML scalars, and the layers resolve in the documented order."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

import cramcl.config as config_mod
from cramcl.config import RunConfig, config_from_dict, parse_overrides, resolve_config
from cramcl.errors import BadInputError


def resolve(*overrides: str, **kw) -> RunConfig:
    kw.setdefault("method", "lora-ft")
    kw.setdefault("profile", "quick")
    return resolve_config(overrides=list(overrides), **kw)


def problems_of(*overrides: str, **kw) -> list[str]:
    with pytest.raises(BadInputError) as err:
        resolve(*overrides, **kw)
    return err.value.problems


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------ unknown keys
@pytest.mark.parametrize("override, key, suggestion", [
    ("sead=1", "sead", "seed"),                                    # top level
    ("trian.lr=1", "trian", "train"),                              # a misspelt section
    ("train.lrr=1", "lrr", "lr"),                                  # inside train.
    ("train.stpes_per_task=3", "stpes_per_task", "steps_per_task"),
    ("data.taks=shape", "taks", "tasks"),                          # inside data.
    ("backbone.hiden_size=8", "hiden_size", "hidden_size"),        # inside backbone.
    ("method.rnak=4", "rnak", "rank"),                             # inside the method's own config
])
def test_unknown_key_names_key_and_nearest_valid_one(override, key, suggestion):
    problems = problems_of(override)
    assert len(problems) == 1, problems
    assert problems[0].startswith("command line"), problems[0]  # names where it came from
    assert f"unknown key '{key}'" in problems[0]
    assert f"did you mean '{suggestion}'" in problems[0]


def test_unknown_key_in_config_file_names_the_file(tmp_path):
    path = write_yaml(tmp_path / "my.yaml", {"train": {"lrr": 0.1}, "method": {"rnak": 2}})
    problems = problems_of(config_file=str(path))
    assert len(problems) == 2, problems
    assert all(p.startswith(str(path)) for p in problems), problems
    assert any("unknown key 'lrr'" in p and "did you mean 'lr'" in p for p in problems)
    assert any("unknown key 'rnak'" in p and "did you mean 'rank'" in p for p in problems)


def test_every_problem_is_reported_at_once():
    problems = problems_of("train.lrr=1", "data.taks=x", "train.lr=abc", "method.rnak=2")
    assert len(problems) == 4, problems


# ------------------------------------------------------------------ wrong types
@pytest.mark.parametrize("override, where, what", [
    ("train.lr=abc", "train.lr", "expected a number"),
    ("train.steps_per_task=1.5", "train.steps_per_task", "expected an integer"),
    ("train.steps_per_task=true", "train.steps_per_task", "expected an integer"),  # a bool is not an int
    ("train.steps_per_task=abc", "train.steps_per_task", "expected an integer"),
    ("seed=x", "seed", "expected an integer"),
    ("data.max_train_per_task=2.5", "data.max_train_per_task", "expected an integer"),
    ("data.tasks={a: 1}", "data.tasks", "expected a list"),
    ("train=3", "train", "expected a mapping"),  # a scalar where a section is wanted
    ("method.rank=eight", "rank", "expected an integer"),
])
def test_wrong_type_is_an_error_naming_the_key(override, where, what):
    problems = problems_of(override)
    assert len(problems) == 1, problems
    assert where in problems[0] and what in problems[0], problems[0]


def test_int_where_a_float_is_wanted_becomes_a_float():
    cfg = resolve("train.lr=1", "train.grad_clip=0")
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert cfg.train.grad_clip == 0.0 and type(cfg.train.grad_clip) is float


# ------------------------------------------------------------------ KEY=VALUE parsing
def test_parse_overrides_reads_yaml_scalars_into_a_nested_dict():
    got = parse_overrides([
        "seed=3", "train.lr=0.5", "train.flag=true", "train.other=false", "data.tasks=[shape, colour]",
        "data.benchmark=null", "data.name=hello", "a.b.c=-2", "data.path=x=y", "data.empty=",
    ])
    assert got == {
        "seed": 3,
        "train": {"lr": 0.5, "flag": True, "other": False},
        "data": {"tasks": ["shape", "colour"], "benchmark": None, "name": "hello", "path": "x=y", "empty": None},
        "a": {"b": {"c": -2}},
    }
    assert type(got["seed"]) is int and type(got["train"]["lr"]) is float


def test_parse_overrides_rejects_a_pair_without_equals():
    with pytest.raises(BadInputError, match="'train.lr' is not KEY=VALUE"):
        parse_overrides(["train.lr"])


def test_overrides_resolve_to_typed_values():
    cfg = resolve("train.lr=3e-4", "train.steps_per_task=7", "seed=11", "data.tasks=shape,colour",
                  "backbone.targets=q_proj", "data.max_train_per_task=10", "train.scheduler=constant",
                  "method.rank=4", "method.alpha=2")
    assert cfg.train.lr == pytest.approx(3e-4) and type(cfg.train.lr) is float  # "3e-4" is a string to YAML
    assert cfg.train.steps_per_task == 7
    assert cfg.seed == 11
    assert cfg.data.tasks == ["shape", "colour"]  # a,b,c becomes a list
    assert cfg.backbone.targets == ["q_proj"]
    assert cfg.data.max_train_per_task == 10
    assert cfg.train.scheduler == "constant"
    assert cfg.method_args == {"rank": 4, "alpha": 2.0, "dropout": 0.05}
    assert resolve("data.tasks=[shape, digits]").data.tasks == ["shape", "digits"]  # YAML list form
    assert resolve("train={lr: 1, steps_per_task: 2}").train.steps_per_task == 2  # a whole section as a mapping
    assert resolve("data.max_train_per_task=10", "data.max_train_per_task=null").data.max_train_per_task is None


def test_method_and_profile_can_be_given_as_overrides():
    cfg = resolve_config(overrides=["method=lora-ft", "profile=quick"])
    assert (cfg.method, cfg.profile, cfg.train.steps_per_task) == ("lora-ft", "quick", 12)


@pytest.mark.parametrize("overrides", [["method=lora-ft", "method.rank=4"], ["method.rank=4", "method=lora-ft"]])
def test_method_name_and_method_args_together_on_the_command_line(overrides):
    """``method=NAME`` and ``method.KEY=V`` together (either order) name the method and set its argument."""
    cfg = resolve_config(profile="quick", overrides=overrides)
    assert cfg.method == "lora-ft"
    assert cfg.method_args["rank"] == 4


def test_method_args_without_a_method_name_is_bad_input_not_a_crash():
    # no --method and no method=NAME: the default method's config gets the key; never a TypeError
    with pytest.raises(BadInputError):
        resolve_config(profile="quick", overrides=["method.rnak=4"])


# ------------------------------------------------------------------ layering
def test_layers_profile_then_file_then_command_line(tmp_path):
    assert resolve_config(method="lora-ft", profile="default").train.steps_per_task == 100
    assert resolve().train.steps_per_task == 12  # profile quick
    path = write_yaml(tmp_path / "c.yaml", {"train": {"steps_per_task": 7, "batch_size": 3}})
    cfg = resolve(config_file=str(path))
    assert cfg.train.steps_per_task == 7  # the file beats the profile
    assert cfg.train.lr == 2.0e-3  # what the file does not set still comes from the profile
    cfg = resolve("train.steps_per_task=5", config_file=str(path))
    assert cfg.train.steps_per_task == 5  # the command line beats the file
    assert cfg.train.batch_size == 3  # the file's other values stay


def test_profile_and_method_named_in_config_file_flags_win(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"profile": "quick", "method": "lora-ft"})
    cfg = resolve_config(config_file=str(path))
    assert (cfg.method, cfg.profile, cfg.train.steps_per_task) == ("lora-ft", "quick", 12)
    cfg = resolve_config(config_file=str(path), profile="default")
    assert (cfg.profile, cfg.train.steps_per_task) == ("default", 100)


def test_method_values_layer_method_yaml_profile_file_command_line(tmp_path, monkeypatch):
    """dataclass defaults < configs/methods/<m>.yaml < profile method_overrides < --config < KEY=VALUE."""
    configs = tmp_path / "configs"
    shutil.copytree(config_mod.CONFIG_DIR, configs)
    (configs / "methods" / "lora-ft.yaml").write_text("rank: 8\nalpha: 16.0\ndropout: 0.2\n")
    quick = yaml.safe_load((configs / "profiles" / "quick.yaml").read_text())
    quick["method_overrides"] = {"lora-ft": {"rank": 3, "alpha": 6.0}, "zero-shot": {}}
    write_yaml(configs / "profiles" / "quick.yaml", quick)
    monkeypatch.setattr(config_mod, "CONFIG_DIR", configs)

    assert resolve().method_args == {"rank": 3, "alpha": 6.0, "dropout": 0.2}
    assert resolve(profile="default").method_args == {"rank": 8, "alpha": 16.0, "dropout": 0.2}
    path = write_yaml(tmp_path / "c.yaml", {"method": {"rank": 5}})
    assert resolve(config_file=str(path)).method_args == {"rank": 5, "alpha": 6.0, "dropout": 0.2}
    assert resolve("method.rank=4", config_file=str(path)).method_args == {"rank": 4, "alpha": 6.0, "dropout": 0.2}


def test_missing_or_invalid_config_file_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="file not found"):
        resolve(config_file=str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(BadInputError, match="invalid YAML"):
        resolve(config_file=str(bad))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(BadInputError, match="expected a mapping"):
        resolve(config_file=str(tmp_path / "list.yaml"))


# ------------------------------------------------------------------ unknown profile / method
@pytest.mark.parametrize("kw", [{"profile": "fast"}, {"profile": None, "overrides": ["profile=fast"]}])
def test_unknown_profile_is_bad_input(kw):
    kw = {"method": "lora-ft", "overrides": [], **kw}
    with pytest.raises(BadInputError, match="unknown profile 'fast'"):
        resolve_config(**kw)


def test_unknown_method_is_bad_input_with_suggestion():
    with pytest.raises(BadInputError) as err:
        resolve_config(method="lora_ft", profile="quick")
    assert err.value.problems == ["--method: unknown method 'lora_ft' (did you mean 'lora-ft'?)"]


# ------------------------------------------------------------------ round trips
def test_config_from_dict_round_trips():
    cfg = resolve("method.rank=4", "data.tasks=shape,colour", "seed=3", "train.lr=0.01")
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    # through the YAML text of config.yaml as well
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))) == cfg
    zs = resolve_config(method="zero-shot", profile="quick")
    assert config_from_dict(zs.to_dict()) == zs


def test_config_from_dict_rejects_unknown_keys():
    data = resolve().to_dict()
    data["train"]["lrr"] = 1
    with pytest.raises(BadInputError, match="unknown key 'lrr'"):
        config_from_dict(data)
    data = resolve().to_dict()
    data["method_args"]["rnak"] = 1
    with pytest.raises(BadInputError, match="unknown key 'rnak'"):
        config_from_dict(data)


def test_saved_config_yaml_passed_back_as_config_file_reproduces_the_run_config(tmp_path):
    """A run's config.yaml given back with --config must not silently drop its method arguments."""
    cfg = resolve("method.rank=4", "method.alpha=2", "seed=5")
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    again = resolve_config(config_file=str(saved))
    assert again.method_args == {"rank": 4, "alpha": 2.0, "dropout": 0.05}
    assert again == cfg


def test_an_empty_value_is_the_empty_text():
    """`backbone.base_path=` (no saved base: train the base stage) is how the shell passes an empty value."""
    cfg = resolve_config(method="zero-shot", profile="default", overrides=["backbone.base_path="])
    assert cfg.backbone.base_path == ""
    assert resolve_config(method="zero-shot", profile="default").backbone.base_path == "builtin"
