"""Configs: the shipped YAML files validate and round-trip; bad fields name file and field."""

from __future__ import annotations

import pytest
from conftest import REPO

from dosegym.diffusion.config import ModelConfig, PretrainConfig, WanConfig
from dosegym.diffusion.slots import ModelSpec
from dosegym.errors import ModelError


@pytest.mark.parametrize("name", ["pretrain_tiny.yaml", "pretrain_cpu.yaml", "pretrain_shipped.yaml"])
def test_shipped_configs_round_trip_yaml(name, tmp_path):
    cfg = PretrainConfig.from_yaml(REPO / "configs" / name)
    (tmp_path / "again.yaml").write_text(cfg.to_yaml())
    assert PretrainConfig.from_yaml(tmp_path / "again.yaml") == cfg


def test_invalid_configs_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  spec:\n    shape: [16, 16]\ntrain:\n  steps: 0\n")
    with pytest.raises(
        ModelError,
        match=r"bad\.yaml: invalid PretrainConfig: model\.spec\.shape.*; train: .*steps must be >= 1",
    ):
        PretrainConfig.from_yaml(bad)
    bad.write_text("model:\n  spec:\n    slots: [ct, mri, dose]\n")
    with pytest.raises(ModelError, match=r"unknown slot\(s\) \['mri'\]"):
        PretrainConfig.from_yaml(bad)
    bad.write_text("model:\n  backbone: wan\n")
    with pytest.raises(ModelError, match="backbone 'wan' needs a 'wan' section"):
        PretrainConfig.from_yaml(bad)
    with pytest.raises(ModelError, match="cannot read config"):
        PretrainConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="pretrained_dir"):
        WanConfig()
    with pytest.raises(ValueError, match="not divisible by groups"):
        ModelConfig.model_validate({"unet": {"base_channels": 12, "groups": 8}})
    with pytest.raises(ValueError, match="generate slot 'dose' is not among slots"):
        ModelSpec(slots=("ct", "targets"))


def test_shipped_config_is_the_shipped_checkpoints_model():
    """configs/pretrain_shipped.yaml rebuilds exactly the shipped network and its schedule."""
    import json

    from dosegym.diffusion.policy import shipped_checkpoint_dir

    cfg = PretrainConfig.from_yaml(REPO / "configs" / "pretrain_shipped.yaml")
    shipped = json.loads((shipped_checkpoint_dir() / "config.json").read_text())
    assert ModelConfig.model_validate(shipped["model"]) == cfg.model
    assert (REPO / cfg.data.cases_file).is_file()
