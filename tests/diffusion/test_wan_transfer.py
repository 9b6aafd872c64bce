"""The video-prior path: a tiny Wan transformer saved with save_pretrained, loaded as our backbone."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from dosegym.diffusion.checkpoint import load_model, save_checkpoint
from dosegym.diffusion.config import ModelConfig, WanConfig
from dosegym.diffusion.model import Any2Any
from dosegym.diffusion.slots import SLOT_CHANNELS, ModelSpec, collate, to_model
from dosegym.errors import ModelError

TINY_WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=32,
    ffn_dim=128,
    num_layers=2,
    rope_max_seq_len=32,
)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    torch.manual_seed(0)
    wan = WanTransformer3DModel(**TINY_WAN)
    folder = tmp_path_factory.mktemp("wan") / "transformer"
    wan.save_pretrained(folder)
    return folder, {k: v.clone() for k, v in wan.state_dict().items()}


def _config(spec, pretrained_dir=None, architecture=None) -> ModelConfig:
    return ModelConfig(
        spec=spec, backbone="wan", wan=WanConfig(pretrained_dir=pretrained_dir, architecture=architecture)
    )


def test_pretrained_blocks_arrive_unchanged_and_new_projections_are_initialised(wan_dir, tiny_spec):
    folder, saved = wan_dir
    model = Any2Any(_config(tiny_spec, pretrained_dir=str(folder.parent)))  # pipeline-style root
    wan = model.backbone.wan
    own = wan.state_dict()
    kept = [k for k in saved if not k.startswith(("patch_embedding", "proj_out"))]
    assert any(k.startswith("blocks.1.attn2") for k in kept)
    for k in kept:
        assert torch.equal(own[k], saved[k]), k
    assert not hasattr(wan, "patch_embedding") and not hasattr(wan, "proj_out")
    dim = 4 * 16
    for slot in tiny_spec.slots:
        enc = model.encoders[slot].proj
        head = model.heads[slot].proj
        assert tuple(enc.weight.shape) == (dim, SLOT_CHANNELS[slot], 1, 2, 2)
        assert tuple(head.weight.shape) == (SLOT_CHANNELS[slot] * 4, dim, 1, 1, 1)
        assert float(enc.weight.detach().abs().sum()) > 0 and float(head.weight.detach().abs().sum()) > 0
    # the saved config rebuilds the architecture without the pretrained folder
    assert model.config.wan.pretrained_dir is None
    assert model.config.wan.architecture["num_layers"] == 2


def test_forward_feeds_one_null_text_token_and_trains(wan_dir, case, tiny_spec):
    folder, _ = wan_dir
    model = Any2Any(_config(tiny_spec, pretrained_dir=str(folder)))
    seen = []
    hook = model.backbone.wan.condition_embedder.text_embedder.register_forward_hook(
        lambda mod, args, out: seen.append(args[0].detach().clone())
    )
    mi, _ = to_model(case, tiny_spec)
    batch = collate([mi, mi])
    x0 = batch.tensors["dose"]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    out = model(noise, torch.tensor([100, 700]), batch)
    hook.remove()
    assert out.shape == x0.shape and torch.isfinite(out).all()
    assert len(seen) == 1 and tuple(seen[0].shape) == (2, 1, 32) and float(seen[0].abs().sum()) == 0.0
    # a training step changes the transferred blocks and the new projections
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before_block = model.backbone.wan.blocks[0].attn1.to_q.weight.detach().clone()
    before_head = model.heads["dose"].proj.weight.detach().clone()
    loss = torch.nn.functional.mse_loss(model(noise, torch.tensor([100, 700]), batch), x0)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before_block, model.backbone.wan.blocks[0].attn1.to_q.weight)
    assert not torch.equal(before_head, model.heads["dose"].proj.weight)


def test_checkpoint_round_trip_without_the_pretrained_folder(wan_dir, case, tiny_spec, tmp_path):
    folder, _ = wan_dir
    model = Any2Any(_config(tiny_spec, pretrained_dir=str(folder))).eval()
    save_checkpoint(tmp_path / "ck", model.config, model.state_dict())
    again = load_model(tmp_path / "ck")
    batch = collate([to_model(case, tiny_spec)[0]])
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([10]), batch), again(x, torch.tensor([10]), batch))


def test_shapes_wan_would_truncate_are_refused(wan_dir):
    folder, _ = wan_dir
    with pytest.raises(ModelError, match="not divisible by the patch size"):
        Any2Any(_config(ModelSpec(shape=(16, 15, 16)), pretrained_dir=str(folder)))
    with pytest.raises(ModelError, match="rope_max_seq_len=32"):
        Any2Any(_config(ModelSpec(shape=(40, 16, 16)), architecture=TINY_WAN))
    with pytest.raises(ModelError, match="no diffusers config.json"):
        Any2Any(_config(ModelSpec(shape=(16, 16, 16)), pretrained_dir=str(folder / "nowhere")))


def test_patch_size_override_keeps_the_blocks(wan_dir, case, tiny_spec):
    folder, saved = wan_dir
    cfg = ModelConfig(
        spec=tiny_spec, backbone="wan", wan=WanConfig(pretrained_dir=str(folder), patch_size=(2, 4, 4))
    )
    model = Any2Any(cfg).eval()
    assert model.token_shape == (8, 4, 4) and model.config.wan.patch_size == (2, 4, 4)
    assert torch.equal(
        model.backbone.wan.blocks[0].ffn.net[0].proj.weight, saved["blocks.0.ffn.net.0.proj.weight"]
    )
    assert tuple(model.encoders["oars"].proj.weight.shape) == (64, 8, 2, 4, 4)
    with torch.no_grad():
        out = model(torch.zeros(1, 1, 16, 16, 16), torch.tensor([3]), collate([to_model(case, tiny_spec)[0]]))
    assert out.shape == (1, 1, 16, 16, 16) and torch.isfinite(out).all()
