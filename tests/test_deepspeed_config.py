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
