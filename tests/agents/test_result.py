"""``dosegym.agents.result``: the result.json schema v1, its writer, reader and validator."""

from __future__ import annotations

import copy
import json

import pytest

from dosegym import agents
from dosegym.agents.evaluate import PolicyPredictor, evaluate
from dosegym.agents.result import RESULT_SCHEMA_VERSION, read_result, validate_result, write_result
from dosegym.errors import AgentError


@pytest.fixture(scope="module")
def document(tiny_policy, headneck28):
    agent = agents.get("best_of_n")(None, tiny_policy, {"n": 2, "seed": 3, "sample_num_steps": 2})
    agent.learn(4)
    pretrained = PolicyPredictor(tiny_policy, "phantom_headneck", steps=2)
    ev = evaluate(pretrained, [headneck28], diversity_samples=2)
    curves = [
        {"iteration": 1, "samples": 2, "wall_s": 0.5, "reward_mean": 0.6, "kl_mean": float("nan")},
        {"iteration": 2, "samples": 4, "wall_s": 1.0, "reward_mean": 0.7, "kl_mean": float("nan")},
    ]
    return agent.result(
        wall_s=1.5,
        train_cases=["phantoms:headneck/0"],
        eval_cases=["phantoms:headneck/28"],
        before=ev.to_dict(),
        after=ev.to_dict(),
        curves=curves,
        eval_history=[{"iteration": 2, "samples": 4, **ev.summary()}],
        extra={"note": float("nan")},
    )


def test_a_full_document_round_trips(document, tmp_path):
    path = write_result(tmp_path, document)
    assert path.name == "result.json"
    doc = read_result(tmp_path)
    assert doc == read_result(path) == json.loads(path.read_text())
    assert doc["schema_version"] == RESULT_SCHEMA_VERSION and doc["agent"] == "best_of_n"
    assert doc["seed"] == doc["config"]["seed"] == 3 and doc["samples_trained"] == 4
    assert doc["curves"][0]["kl_mean"] is None and doc["extra"]["note"] is None  # NaN -> null
    assert doc["packages"]["torch"] and doc["device"] == "cpu"
    assert doc["base_checkpoint"] is None  # a policy given in memory
    assert doc["after"]["summary"]["diversity_gy"] >= 0
    assert doc["after"]["cases"][0]["items"]["PTV70 D95% [Gy]"] in ("ideal", "good", "variation", "fail")


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("schema_version",), 1, "schema_version: this dosegym .* reads schema_version 2"),
        (("agent",), "", "agent: must be a non-empty string"),
        (("wall_s",), float("nan"), "wall_s: must be a finite number"),
        (("samples_trained",), -1, "samples_trained: must be >= 0"),
        (("seed",), 4, r"seed: must be config.seed \(3\)"),
        (("config", "agent"), "ddpo", "config.agent: must be the agent 'best_of_n'"),
        (("curves", 1, "samples"), 4.5, r"curves\[1\].samples: must be an integer"),
        (("curves", 0, "loss"), "big", r"curves\[0\].loss: must be a finite number or null"),
        (("after", "summary", "score_mean"), float("inf"), "after.summary.score_mean: must be a finite"),
        (("before", "cases", 0, "items", "PTV70 D95% [Gy]"), "ok", r"before.cases\[0\].items\['PTV70 D95"),
        (("before", "summary", "pass_rate", "PTV70 D95% [Gy]"), 1.5, r"must be in \[0.0, 1.0\]"),
        (("eval_cases",), "phantoms:headneck/28", "eval_cases: must be a list"),
        (("created_utc",), "yesterday", "created_utc: must be an ISO 8601 time"),
    ],
)
def test_a_bad_value_is_named(document, path, value, message):
    bad = copy.deepcopy(document)
    target = bad
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(AgentError, match=message):
        validate_result(bad)


@pytest.mark.parametrize("key", ["after", "curves", "packages", "git_revision"])
def test_a_missing_key_is_named(document, key):
    bad = {k: v for k, v in document.items() if k != key}
    with pytest.raises(AgentError, match=f"{key}: required key missing"):
        validate_result(bad)


def test_unknown_keys_and_unreadable_files_are_refused(document, tmp_path):
    with pytest.raises(AgentError, match=r"scores: unknown key; valid keys: \["):
        validate_result({**document, "scores": {}})
    with pytest.raises(AgentError, match=r"after.cases\[0\].grade: unknown key"):
        bad = copy.deepcopy(document)
        bad["after"]["cases"][0]["grade"] = "A"
        validate_result(bad)
    with pytest.raises(AgentError, match="no such result file"):
        read_result(tmp_path)
    (tmp_path / "result.json").write_text("{not json")
    with pytest.raises(AgentError, match="not a readable JSON result"):
        read_result(tmp_path / "result.json")
    (tmp_path / "result.json").write_text(json.dumps({**document, "schema_version": 0}, default=str))
    with pytest.raises(AgentError, match="result.json: result.json: schema_version"):
        read_result(tmp_path)


def test_write_refuses_an_invalid_document(document, tmp_path):
    with pytest.raises(AgentError, match="iterations: must be an integer"):
        write_result(tmp_path / "r.json", {**document, "iterations": None})
    assert not (tmp_path / "r.json").exists()
