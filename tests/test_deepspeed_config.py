"""The shipped DeepSpeed ZeRO-2 option parses and says what the paper's setting is."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1] / "src" / "cramcl" / "configs" / "accelerate"


def test_zero2_json_is_stage_2_with_auto_batch_settings():
    cfg = json.loads((ROOT / "deepspeed_zero2.json").read_text())
    assert cfg["zero_optimization"]["stage"] == 2
    # Accelerate fills "auto" from the run, so the batch in env.json and in DeepSpeed can never disagree
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert cfg[key] == "auto"
    assert cfg["bf16"]["enabled"] == "auto"


def test_accelerate_config_points_at_the_json_and_is_deepspeed():
    cfg = yaml.safe_load((ROOT / "deepspeed_zero2.yaml").read_text())
    assert cfg["distributed_type"] == "DEEPSPEED"
    assert (ROOT.parents[3] / cfg["deepspeed_config"]["deepspeed_config_file"]).exists()  # from the repo root
    assert cfg["deepspeed_config"]["zero3_init_flag"] is False


def test_accelerate_parses_the_plugin_when_deepspeed_is_installed():
    pytest.importorskip("deepspeed")
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(hf_ds_config=str(ROOT / "deepspeed_zero2.json"))
    assert plugin.zero_stage == 2


def test_a_deepspeed_launch_is_warned_that_it_has_not_run(tmp_path, monkeypatch, warm_cache):
    """A user launching deepspeed_zero2.yaml learns at the start that this path is unverified and which launch
    is tested (it could otherwise resume a step checkpoint holding one process's optimizer partition)."""
    from accelerate.utils import DistributedType

    import cramcl.engine.session as session_module
    from conftest import LogSink, quick_config

    real = session_module.make_accelerator

    class AsIfDeepSpeed:
        def __init__(self, accelerator):
            self._accelerator = accelerator
            self.distributed_type = DistributedType.DEEPSPEED

        def __getattr__(self, name):
            return getattr(self._accelerator, name)

    monkeypatch.setattr(session_module, "make_accelerator", lambda cfg, out: AsIfDeepSpeed(real(cfg, out)))
    log = LogSink()
    session_module.open_session(quick_config("lora-ft"), tmp_path, log=log)
    warned = [line for line in log.lines if "DeepSpeed has not been run" in line]
    assert len(warned) == 1 and "fsdp.yaml" in warned[0]
    log = LogSink()
    monkeypatch.setattr(session_module, "make_accelerator", real)
    session_module.open_session(quick_config("lora-ft"), tmp_path / "plain", log=log)
    assert not any("DeepSpeed" in line for line in log.lines)
