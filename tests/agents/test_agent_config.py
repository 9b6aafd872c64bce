"""AgentConfig: YAML round-trip, unknown fields, the registry's names, the budget check,
result.json."""

from __future__ import annotations

import json

import pytest
import yaml

import dosegym.agents as agents
from dosegym.agents.config import AgentConfig
from dosegym.errors import AgentError


def test_yaml_round_trip(tmp_path):
    cfg = agents.get("best_of_n").Config(
        n=3,
        learning_rate=3e-4,
        lr_schedule="cosine",
        warmup_iterations=2,
        seed=7,
        reward={"w_kl": 0.1, "scale": "raw"},
        lora_targets=["backbone.mid1.conv1"],
        eval_cases=["phantoms:headneck/28"],
    )
    path = tmp_path / "cfg.yaml"
    text = cfg.to_yaml(path)
    assert path.read_text() == text and text.startswith("agent: best_of_n\n")
    back = type(cfg).from_yaml(path)
    assert back == cfg
    assert type(cfg).from_yaml(text) == cfg
    assert back.reward_config().w_kl == 0.1  # builds the env's RewardConfig


def test_shared_fields_have_docstrings():
    for name, field in AgentConfig.model_fields.items():
        assert field.description, f"AgentConfig.{name} has no one-line docstring"
    assert agents.get("best_of_n").Config.model_fields["n"].description


def test_unknown_field_lists_valid_ones(tmp_path):
    with pytest.raises(AgentError, match=r"unknown field 'learning_rat'.*valid fields: \[.*'learning_rate'"):
        AgentConfig.coerce({"learning_rat": 1e-3})
    with pytest.raises(AgentError, match=r"unknown field 'reward.w_kll'.*valid reward fields"):
        AgentConfig.coerce({"reward": {"w_kll": 1.0}})
    with pytest.raises(AgentError, match=r"field 'lora_rank'"):
        AgentConfig.coerce({"lora_rank": 0})
    bad = tmp_path / "bad.yaml"
    bad.write_text("agent: best_of_n\nnn: 4\n")
    with pytest.raises(AgentError, match=r"bad.yaml.*unknown field 'nn'.*'n'"):
        agents.get("best_of_n").Config.from_yaml(bad)
    other = tmp_path / "other.yaml"
    other.write_text("agent: ddpo\n")
    with pytest.raises(AgentError, match="for agent 'ddpo', not 'best_of_n'"):
        agents.get("best_of_n").Config.from_yaml(other)


def test_unknown_agent_lists_valid_ones():
    assert "best_of_n" in agents.available()
    with pytest.raises(AgentError, match=r"unknown agent 'bestofn'; valid: \['best_of_n'"):
        agents.get("bestofn")


def test_learning_rate_schedule():
    c = AgentConfig(learning_rate=1.0, lr_schedule="cosine", warmup_iterations=2)
    lrs = [c.learning_rate_at(i, 10) for i in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2] == 1.0 and lrs[-1] < 0.1
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert AgentConfig(learning_rate=0.1).learning_rate_at(5, 10) == 0.1


def test_budget_smaller_than_one_iteration_is_refused(tiny_policy):
    agent = agents.get("best_of_n")(None, tiny_policy, {"n": 4})
    assert agent.check_budget(9) == 2
    with pytest.raises(AgentError, match="minimum is total_samples=4"):
        agent.learn(3)
    with pytest.raises(AgentError, match="must be an integer"):
        agent.check_budget(4.0)


def test_iteration_must_fill_the_vector_env(env, tiny_policy):
    from dosegym.agents.base import Agent

    class Learner(Agent):
        name = "learner"

    with pytest.raises(AgentError, match="samples_per_iteration 3 is not a multiple of the env's num_envs 2"):
        Learner(env, tiny_policy, {"samples_per_iteration": 3})
    assert Learner(env, tiny_policy, {"samples_per_iteration": 4}).check_budget(8) == 2
    with pytest.raises(AgentError, match="fp16' needs a GPU"):
        Learner(env, tiny_policy, {"samples_per_iteration": 4, "mixed_precision": "fp16"})


def test_missing_yaml_file_is_named(tmp_path):
    with pytest.raises(AgentError, match="nope.yaml: cannot read"):
        AgentConfig.from_yaml(str(tmp_path / "nope.yaml"))


def test_result_json_is_versioned(tmp_path, tiny_policy):
    from dosegym.agents.result import RESULT_SCHEMA_VERSION, write_result

    agent = agents.get("best_of_n")(None, tiny_policy, {"n": 2, "seed": 3})
    agent.learn(4)
    path = write_result(tmp_path, agent.result(extra={"x": float("nan")}))
    doc = json.loads(path.read_text())
    assert path.name == "result.json"
    assert doc["schema_version"] == RESULT_SCHEMA_VERSION and doc["agent"] == "best_of_n" and doc["seed"] == 3
    assert doc["config"]["n"] == 2 and doc["samples_trained"] == 4 and doc["extra"]["x"] is None
    assert doc["packages"]["torch"] and doc["packages"]["dosegym"]


def test_register_a_plugin_agent(tiny_policy, tmp_path):
    from dosegym.agents import registry
    from dosegym.agents.base import Agent

    class Plugin(Agent):
        learns = False

        def learn(self, total_samples, callback=None):
            self.check_budget(total_samples)
            return self

    try:
        registry.register("plugin")(Plugin)
        assert agents.get("plugin") is Plugin and "plugin" in agents.available()
        assert Plugin.Config.agent_name == "plugin" and AgentConfig.agent_name == ""
        with pytest.raises(AgentError, match="registered already"):
            registry.register("best_of_n")(Plugin)
        Plugin(None, tiny_policy).save(tmp_path / "p")
        assert type(agents.load(tmp_path / "p", policy=tiny_policy)) is Plugin
        with pytest.raises(AgentError, match="through its class"):
            Agent.load(tmp_path / "p", policy=tiny_policy)
        with pytest.raises(AgentError, match="holds a 'plugin' agent, not 'best_of_n'"):
            agents.get("best_of_n").load(tmp_path / "p", policy=tiny_policy)
    finally:
        registry._CLASSES.pop("plugin", None)


def test_every_shipped_align_config_loads_into_its_agent():
    """``dosegym/agents/configs/<agent>.yaml`` (what benchmarks/align_runs.sh and ``dosegym demo``
    run): one per registered agent, each a valid config of that agent."""
    from pathlib import Path

    for name in agents.registry.AGENTS:
        path = agents.registry.shipped_config(name)
        assert path is not None, name
        cfg = agents.get(name).Config.from_yaml(path)
        assert cfg.agent_name == name and cfg.samples_per_iteration >= 1
    # the measured experiments' configs load into the agent their ``agent`` key names
    folder = Path(__file__).resolve().parents[2] / "configs" / "align"
    experiments = sorted(folder.glob("*/*.yaml"))
    assert {f.stem for f in experiments} >= {"off", "on", "control"}
    for f in experiments:
        name = yaml.safe_load(f.read_text())["agent"]
        assert agents.get(name).Config.from_yaml(f).agent_name == name
