"""What trains: LoRA adapters through peft on a copy of the denoiser, or full weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dosegym.agents import lora
from dosegym.agents.base import Agent
from dosegym.diffusion import ModelInput
from dosegym.errors import AgentError


class _Trainer(Agent):
    """A minimal learning agent (not registered): one optimizer step on a made-up loss."""

    name = "_test_trainer"

    def learn(self, total_samples, callback=None):
        self.check_budget(total_samples)
        return self


def _one_step(agent, cond):
    """One Adam step of the trainable parameters on the squared output of a forward pass."""
    model = agent.policy.model
    x = torch.randn((1, 1, *agent.policy.spec.shape), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(agent.parameters(), lr=1e-2)
    loss = model(x, torch.tensor([500]), cond).pow(2).mean()
    loss.backward()
    opt.step()


@pytest.fixture(scope="module")
def cond(tiny_policy, headneck28) -> ModelInput:
    return tiny_policy.conditions(headneck28)


def test_only_adapters_train_and_the_base_is_untouched(tiny_policy, cond, headneck28):
    before = {k: v.clone() for k, v in tiny_policy.model.state_dict().items()}
    ref_out = tiny_policy.reference().predict(headneck28, steps=3, seed=0)
    agent = _Trainer(None, tiny_policy, {"train": "lora", "lora_rank": 2})
    names = lora.lora_target_names(tiny_policy.model)
    assert agent.trains["target_modules"] == names and "backbone.mid_attn.qkv" in names
    trainable = [n for n, p in agent.policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert agent.trains["trainable_parameters"] == sum(p.numel() for p in agent.parameters())
    assert agent.trains["trainable_parameters"] < tiny_policy.model.num_parameters() / 2
    # untrained adapters (lora_B = 0) change nothing
    np.testing.assert_array_equal(agent.predict(headneck28, 0), tiny_policy.predict(headneck28, seed=0))
    _one_step(agent, cond)
    assert any(
        float(p.detach().abs().sum()) > 0 for n, p in agent.policy.model.named_parameters() if "lora_B" in n
    )
    assert not np.array_equal(agent.predict(headneck28, 0), tiny_policy.predict(headneck28, seed=0))
    # the given policy and its frozen reference did not change
    for k, v in tiny_policy.model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert agent.reference() is tiny_policy.reference()
    np.testing.assert_array_equal(tiny_policy.reference().predict(headneck28, steps=3, seed=0), ref_out)


@pytest.mark.parametrize("train", ["lora", "full"])
def test_save_load_gives_identical_predictions(tmp_path, tiny_policy, cond, headneck28, train):
    agent = _Trainer(None, tiny_policy, {"train": train, "lora_rank": 2, "seed": 5})
    _one_step(agent, cond)
    agent.samples_trained = 8
    out = agent.save(tmp_path / "run")
    files = sorted(p.name for p in out.iterdir())
    if train == "lora":
        assert "adapter.safetensors" in files and "weights.safetensors" not in files
        from safetensors.torch import load_file

        saved = load_file(str(out / "adapter.safetensors"))
        assert saved and all("lora_" in k for k in saved)
        assert json.loads((out / "adapter.json").read_text())["rank"] == 2
    else:
        assert "weights.safetensors" in files
    loaded = _Trainer.load(out, policy=tiny_policy)
    assert type(loaded) is _Trainer and loaded.config == agent.config and loaded.samples_trained == 8
    np.testing.assert_array_equal(loaded.predict(headneck28, 3), agent.predict(headneck28, 3))
    assert loaded.trains == agent.trains
    agent.save(tmp_path / "run")  # an earlier output of the same writer is replaced


def test_load_refuses_another_base(tmp_path, tiny_policy):
    agent = _Trainer(None, tiny_policy, {"lora_rank": 2})
    agent.save(tmp_path / "run")
    with pytest.raises(AgentError, match="given in memory.*pass policy="):
        _Trainer.load(tmp_path / "run")
    other = lora.trainable_policy(tiny_policy, "full")[0]
    with torch.no_grad():
        next(other.model.parameters()).add_(1.0)
    with pytest.raises(AgentError, match="not the ones the agent was trained from"):
        _Trainer.load(tmp_path / "run", policy=other)
    with pytest.raises(AgentError, match="not a saved agent"):
        Agent.load(tmp_path)


def test_bad_lora_targets_list_valid_ones(tiny_policy):
    with pytest.raises(AgentError, match=r"not Conv3d/Linear layers.*valid: \['backbone.time_mlp.0'"):
        _Trainer(None, tiny_policy, {"lora_targets": ["backbone.nope"]})
    agent = _Trainer(None, tiny_policy, {"lora_targets": ["backbone.mid1.conv1"], "lora_rank": 1})
    assert {n.split(".lora_")[0] for n, _ in agent.policy.model.named_parameters() if "lora_" in n} == {
        "backbone.mid1.conv1"
    }


def test_merged_copy_folds_every_layer_kind_exactly():
    """1x1x1 and 3x3x3 Conv3d and Linear layers: the copy's outputs are the LoRA model's to
    float rounding (peft 0.21's own get_delta_weight fails on the 1x1x1 Conv3d)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(3, 6, 1),
        torch.nn.Conv3d(6, 4, 3, padding=1),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 27, 5),
    )
    lora.inject_lora(net, rank=2, alpha=4.0)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    copy = lora.MergedCopy(net)
    x = torch.randn(2, 3, 3, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(copy.model(x), net(x), rtol=1e-5, atol=1e-5)
    assert [type(m).__name__ for m in copy.model] == ["Conv3d", "Conv3d", "Flatten", "Linear"]
    assert not any(p.requires_grad for p in copy.model.parameters())


def test_rollouts_and_predictions_sample_from_the_merged_copy(tiny_policy, cond, headneck28):
    from peft.tuners.lora import LoraLayer

    agent = _Trainer(None, tiny_policy, {"train": "lora", "lora_rank": 2})
    _one_step(agent, cond)
    model = agent.policy.model
    bases = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    sampling = agent.sampling_policy()
    assert not any(isinstance(m, LoraLayer) for m in sampling.model.modules())
    x = torch.randn((1, 1, *agent.policy.spec.shape), generator=torch.Generator().manual_seed(2))
    t = torch.tensor([700])
    for _ in range(2):  # after each update the copy follows the adapters
        with torch.no_grad():
            lora_out, merged_out = model(x, t, cond), agent.sampling_policy().model(x, t, cond)
            assert float((lora_out - tiny_policy.model(x, t, cond)).abs().max()) > 1e-3
        torch.testing.assert_close(merged_out, lora_out, rtol=1e-5, atol=1e-5)
        _one_step(agent, cond)
    assert agent.sampling_policy() is sampling
    for n, p in model.named_parameters():  # nothing is merged into the trained model itself
        if "lora_" not in n:
            torch.testing.assert_close(p.detach(), bases[n], rtol=0, atol=0)
    c = agent.config
    through_lora = agent.policy.predict(headneck28, steps=c.sample_num_steps, seed=3, eta=c.predict_eta)
    np.testing.assert_allclose(agent.predict(headneck28, 3), through_lora, rtol=0, atol=1e-3)
    full = _Trainer(None, tiny_policy, {"train": "full"})
    assert full.sampling_policy() is full.policy
