"""The native-resolution refiner: decoding through it, its checkpoint folder, its training."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from helpers import make_env, save_tiny_checkpoint, tiny_policy_config
from typer.testing import CliRunner

from dosegym.cli.main import app
from dosegym.data import phantoms
from dosegym.diffusion import DosePolicy, load_pretrained, to_model
from dosegym.diffusion.config import DataConfig
from dosegym.diffusion.refiner import (
    REFINER_CHANNELS,
    REFINER_DIR,
    CaseDecoder,
    Refiner,
    RefinerConfig,
    RefinerInputs,
    body_crop,
    checkpoint_refiner,
    load_refiner,
    save_refiner,
)
from dosegym.diffusion.refiner_train import (
    RefinerTrainConfig,
    draw_batch,
    make_example,
    masked_l1,
    train_refiner,
)
from dosegym.errors import ModelError

SMALL = RefinerConfig(channels=(2, 4, 4), margin_vox=2)


@pytest.fixture(scope="module")
def phantom():
    return phantoms.load_shipped_phantom("headneck", 28)


def _random(refiner: Refiner, seed: int = 0) -> Refiner:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in refiner.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return refiner.eval()


def test_an_untrained_refiner_is_the_identity_and_decoding_is_differentiable(phantom):
    spec = tiny_policy_config().spec
    mi, res = to_model(phantom, spec)
    x = mi.tensors["dose"][None, 0].clone()  # (1, Z, Y, X) normalised
    plain = res.decode(x)
    refined = CaseDecoder(phantom, res, Refiner(SMALL)).decode(x)
    assert refined.shape == plain.shape == (1, *phantom.grid.shape)
    torch.testing.assert_close(refined, plain)  # the head starts at zero: refined == coarse

    decoder = CaseDecoder(phantom, res, _random(Refiner(SMALL)).requires_grad_(True))
    xg = x.clone().requires_grad_(True)
    dose = decoder.decode(xg)
    assert not torch.allclose(dose, plain)
    dose[0][torch.from_numpy(phantom.body)].mean().backward()
    assert xg.grad is not None and float(xg.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in decoder.refiner.parameters())
    dose = dose.detach()
    assert float(dose.min()) >= 0 and float(dose[0][~torch.from_numpy(phantom.body)].abs().max()) == 0


def test_refiner_inputs_follow_the_channel_order_and_the_crop(phantom):
    inputs = RefinerInputs.of(phantom, SMALL)
    crop = body_crop(phantom, SMALL.margin_vox)
    assert inputs.crop == crop and inputs.shape == tuple(s.stop - s.start for s in crop)
    idx = np.argwhere(phantom.body)
    for a, s in enumerate(crop):  # the body's box plus the margin, clipped to the grid
        assert s.start == max(int(idx[:, a].min()) - 2, 0)
        assert s.stop == min(int(idx[:, a].max()) + 3, phantom.grid.shape[a])
    coarse = torch.full((2, *inputs.shape), 0.5)
    stack = inputs.stack(coarse, SMALL)
    assert stack.shape == (2, len(REFINER_CHANNELS), *inputs.shape)
    ch = {n: stack[0, i] for i, n in enumerate(REFINER_CHANNELS)}
    assert float(ch["coarse"].max()) == 0.5
    ptv70 = torch.from_numpy(phantom.structures["PTV70"][crop])
    assert float(ch["targets"][ptv70].min()) == 1.0  # the highest Rx's target is 1
    assert torch.equal(ch["body"].bool(), torch.from_numpy(phantom.body[crop]))
    assert float(ch["spacing_z"].mean()) == pytest.approx(phantom.grid.spacing_mm[0] / 5.0)
    assert float(ch["ct"].min()) >= -1 and float(ch["ct"].max()) <= 1


def test_odd_sizes_are_padded_and_cropped_back():
    out = _random(Refiner(SMALL))(torch.zeros(1, len(REFINER_CHANNELS), 7, 9, 10))
    assert out.shape == (1, 1, 7, 9, 10)
    with pytest.raises(ModelError, match="inputs must be"):
        Refiner(SMALL)(torch.zeros(1, 3, 8, 8, 8))


def test_a_checkpoint_carries_its_refiner(tmp_path, phantom):
    ckpt = save_tiny_checkpoint(tmp_path / "model")
    assert load_pretrained(ckpt).refiner is None  # without refiner/: decode as before
    refiner = _random(Refiner(SMALL))
    spec = tiny_policy_config().spec
    save_refiner(ckpt / REFINER_DIR, refiner, {"model_spec": spec.model_dump(mode="json")})
    policy = load_pretrained(ckpt)
    assert policy.refiner is not None and not any(p.requires_grad for p in policy.refiner.parameters())
    assert load_pretrained(ckpt, refiner=False).refiner is None
    for a, b in zip(refiner.state_dict().values(), load_refiner(ckpt / REFINER_DIR).state_dict().values()):
        assert torch.equal(a, b)
    # predict decodes through it, and so do the env and the agents' copies of the policy
    dose = policy.predict(phantom, steps=2, seed=0)
    coarse = load_pretrained(ckpt, refiner=False).predict(phantom, steps=2, seed=0)
    assert dose.shape == coarse.shape and not np.allclose(dose, coarse)
    assert policy.reference().refiner is policy.refiner
    # a refiner trained for another model grid is refused
    other = spec.model_copy(update={"shape": (8, 8, 8)})
    save_refiner(ckpt / REFINER_DIR, refiner, {"model_spec": other.model_dump(mode="json")})
    with pytest.raises(ModelError, match="trained for the model grid"):
        checkpoint_refiner(ckpt, spec)
    (ckpt / REFINER_DIR / "config.json").write_text('{"format": "something else"}')
    with pytest.raises(ModelError, match="expected 'dosegym-refiner'"):
        load_pretrained(ckpt)


def test_the_env_decodes_its_reward_dose_as_predict_does(tmp_path, phantom):
    spec = tiny_policy_config().spec
    torch.manual_seed(0)
    from dosegym.diffusion import Any2Any

    policy = DosePolicy(Any2Any(tiny_policy_config()), refiner=_random(Refiner(SMALL)))
    env = make_env(policy)
    env.reset(seed=0)
    cd = env.core.cds[0]
    assert cd.decoder.refiner is policy.refiner
    x = torch.rand(1, *spec.shape)
    torch.testing.assert_close(
        env.core.decode(cd, x), policy.decode(x[None], policy.conditions(phantom), phantom)[0]
    )
    env.close()


def _tiny_run(**updates) -> RefinerTrainConfig:
    fields = dict(
        refiner=SMALL, data=DataConfig(phantom_sites=("headneck",), max_cases=3), steps=8, batch_size=2,
        patch_vox=(8, 16, 16), warmup_steps=2, checkpoint_every=4, log_every=2,
    )  # fmt: skip
    return RefinerTrainConfig(**{**fields, **updates})


def test_training_batches_are_seeded_and_masked(phantom):
    spec = tiny_policy_config().spec
    ex = make_example(phantom, spec, SMALL, "phantoms:headneck/28")
    assert ex.coarse.dtype == ex.target.dtype == np.float16 and ex.coarse.shape == ex.inputs.shape
    # the round trip blurs the reference: the coarse input is not the target
    assert float(np.abs(ex.coarse.astype(np.float32) - ex.target.astype(np.float32)).max()) > 0.05
    cfg = _tiny_run()
    a, b = draw_batch([ex], cfg, 3), draw_batch([ex], cfg, 3)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    x, y, m = a
    assert x.shape == (2, len(REFINER_CHANNELS), 8, 16, 16) and y.shape == m.shape == (2, 1, 8, 16, 16)
    assert float(m.sum()) > 0
    assert not torch.equal(draw_batch([ex], cfg, 4)[0], x)
    assert float(masked_l1(y, y, m)) == 0.0
    without = phantom.__class__(**{**phantom.__dict__, "dose": None})
    with pytest.raises(ModelError, match="reference dose"):
        make_example(without, spec, SMALL, "no-dose")


def test_training_lowers_the_loss_and_resume_continues_exactly(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "model")
    net = RefinerConfig(channels=(4, 8, 8), margin_vox=2)
    cfg = _tiny_run(refiner=net, steps=60, lr=3e-3, checkpoint_every=20, log_every=20)
    whole = train_refiner(cfg, ckpt, tmp_path / "whole", progress=False)
    # on fixed batches, the trained refiner is closer to the reference than the identity
    spec = tiny_policy_config().spec
    examples = [
        make_example(phantoms.load_shipped_phantom("headneck", i), spec, SMALL, str(i)) for i in (0, 1, 2)
    ]
    trained, identity = load_refiner(whole.refiner_dir), Refiner(SMALL)
    with torch.no_grad():
        batches = [draw_batch(examples, cfg, 1000 + i) for i in range(4)]
        after = np.mean([float(masked_l1(trained(x), y, m)) for x, y, m in batches])
        before = np.mean([float(masked_l1(identity(x), y, m)) for x, y, m in batches])
    assert after < 0.95 * before  # measured: 0.041 against 0.046
    part = train_refiner(cfg, ckpt, tmp_path / "part", until=20, progress=False)
    assert part.step == 20
    with pytest.raises(ModelError, match="--resume"):
        train_refiner(cfg, ckpt, tmp_path / "part", progress=False)
    with pytest.raises(ModelError, match="different config"):
        train_refiner(
            cfg.model_copy(update={"lr": 1e-3}), ckpt, tmp_path / "part", resume=True, progress=False
        )
    rest = train_refiner(cfg, ckpt, tmp_path / "part", resume=True, progress=False)
    assert rest.step == 60
    a, b = load_refiner(whole.refiner_dir), load_refiner(rest.refiner_dir)
    for (k, u), v in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(u, v), k
    state = torch.load(tmp_path / "whole" / "train_state.pt", weights_only=True)
    assert [step for step, _ in state["curve"]] == [20, 40, 60]
    # the folder is a checkpoint's refiner/: copied in, the policy decodes through it
    shutil.copytree(whole.refiner_dir, ckpt / REFINER_DIR)
    assert load_pretrained(ckpt).refiner is not None


def test_cli_train_refiner_help_and_bad_config(tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["train-refiner", "--help"]).exit_code == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 0\nunknown_field: 1\n")
    result = runner.invoke(app, ["train-refiner", "--config", str(bad), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "steps" in result.output and "unknown_field" in result.output and "Traceback" not in result.output


def test_the_shipped_recipe_validates():
    from shared_data import REPO

    cfg = RefinerTrainConfig.from_yaml(REPO / "configs" / "refiner" / "shipped.yaml")
    assert cfg.data.openkbp_dir and cfg.data.phantoms and cfg.steps >= 1000
