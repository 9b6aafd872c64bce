"""Configs: the shipped YAML files validate and round-trip; bad fields name file and field."""

from __future__ import annotations

import pytest
from shared_data import REPO

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


def test_configs_derive_from_the_shipped_recipe():
    """configs/pretrain_shipped.yaml is the base; every other config states only its overrides."""
    import yaml

    names = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert "pretrain_shipped.yaml" in names
    for name in names:
        doc = yaml.safe_load((REPO / "configs" / name).read_text())
        assert doc.get("base") == (None if name == "pretrain_shipped.yaml" else "pretrain_shipped.yaml"), name


def test_base_merges_mappings_and_replaces_other_values(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text(
        "model:\n  unet:\n    base_channels: 16\n    channel_mult: [1, 2, 4]\n"
        "train:\n  steps: 7\n  lr: 0.01\ndata:\n  max_cases: 3\n"
    )
    b = tmp_path / "sub" / "b.yaml"  # the base's path is relative to the file naming it
    b.write_text(
        "base: ../a.yaml\nmodel:\n  unet:\n    channel_mult: [1, 2]\n"
        "train:\n  steps: 9\ndata:\n  max_cases: null\n"
    )
    cfg = PretrainConfig.from_yaml(b)
    assert (cfg.model.unet.base_channels, cfg.model.unet.channel_mult) == (16, (1, 2))
    assert (cfg.train.steps, cfg.train.lr, cfg.data.max_cases) == (9, 0.01, None)
    (tmp_path / "again.yaml").write_text(cfg.to_yaml())
    assert PretrainConfig.from_yaml(tmp_path / "again.yaml") == cfg

    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ModelError, match=r"c\.yaml: base 'd\.yaml' makes a circle"):
        PretrainConfig.from_yaml(tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ModelError, match=r"missing\.yaml: cannot read config"):
        PretrainConfig.from_yaml(tmp_path / "e.yaml")
    (tmp_path / "f.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ModelError, match="base must be the path of another YAML config"):
        PretrainConfig.from_yaml(tmp_path / "f.yaml")
    (tmp_path / "g.yaml").write_text("base: a.yaml\ntrain:\n  steps: 0\n")
    with pytest.raises(ModelError, match=r"g\.yaml: invalid PretrainConfig: train: .*steps must be >= 1"):
        PretrainConfig.from_yaml(tmp_path / "g.yaml")
