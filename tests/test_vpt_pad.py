"""VPT-pad (VPT's ConvNet variant): a learnable frame of pixels around every image."""

from __future__ import annotations

import json

import pytest
import torch
from timm.models.mlp_mixer import MlpMixer
from torch import nn

import vprompt
from vprompt.backbones import load_backbone
from vprompt.errors import ConfigError, TaskError

CNN = "timm:resnet10t?pretrained=false"
SIZE = 32


@pytest.fixture(scope="module")
def bb():
    return load_backbone(CNN, img_size=SIZE)


def _normalised(t: torch.Tensor, bb) -> torch.Tensor:
    mean = torch.tensor(bb.data_config.mean).view(1, 3, 1, 1)
    std = torch.tensor(bb.data_config.std).view(1, 3, 1, 1)
    return (t - mean) / std


def test_frame_layout_init_and_parameter_count(bb, single_thread):
    p, s, b = 3, SIZE, 2
    model = vprompt.attach(bb, "vpt-pad", num_classes=4, prompt_len=p)
    assert model.method.img_size == s  # the backbone's input size
    tb, lr = model.method.prompt_tb.detach(), model.method.prompt_lr.detach()
    assert sum(t.numel() for t in model.method.parameters()) == 12 * p * (s + p)
    assert min(tb.min(), lr.min()) >= 0 and max(tb.max(), lr.max()) < 1  # pixel values
    assert bb.data_config.mean != (0.0, 0.0, 0.0)  # the normalisation below is not a no-op

    x = torch.randn(b, 3, s, s)
    out = model.method.pad(x)
    assert out.shape == (b, 3, s + 2 * p, s + 2 * p)
    assert torch.equal(out[:, :, p : p + s, p : p + s], x)
    tb, lr = _normalised(tb, bb), _normalised(lr, bb)  # prompts are normalised like images
    torch.testing.assert_close(out[:, :, :p, :], tb[:, :, :p].expand(b, -1, -1, -1))  # top
    torch.testing.assert_close(out[:, :, p + s :, :], tb[:, :, p:].expand(b, -1, -1, -1))
    torch.testing.assert_close(out[:, :, p : p + s, :p], lr[..., :p].expand(b, -1, -1, -1))
    torch.testing.assert_close(out[:, :, p : p + s, p + s :], lr[..., p:].expand(b, -1, -1, -1))

    raw = vprompt.attach(bb, "vpt-pad", num_classes=4, prompt_len=p, init="normal")
    top = raw.method.prompt_tb.detach()[:, :, :p]
    assert torch.equal(raw.method.pad(x)[:, :, :p, :], top.expand(b, -1, -1, -1))  # as drawn
    assert top.min() < 0  # standard normal, not pixel values


def test_only_the_frame_and_head_train_and_the_backbone_stays_frozen(bb, single_thread):
    model = vprompt.attach(bb, "vpt-pad", num_classes=3, prompt_len=2)
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    x, y = torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        framed = bb.model.forward_features(model.method.pad(x))
        assert torch.equal(model.forward_features(x), framed)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    start = model.method.prompt_tb.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        assert all(p.grad is None for p in bb.model.parameters())
        assert model.method.prompt_tb.grad.abs().sum() > 0
        assert model.method.prompt_lr.grad.abs().sum() > 0
        opt.step()
    assert not torch.equal(model.method.prompt_tb, start)
    for k, v in bb.model.state_dict().items():  # weights and batch-norm statistics
        assert torch.equal(v, before[k]), f"frozen {k} changed"
    assert {n.split(".")[0] for n in model.task_state_dict()} == {"method", "head"}


def test_task_round_trip_stores_the_size(bb, tmp_path, single_thread):
    model = vprompt.attach(bb, "vpt-pad", num_classes=3, prompt_len=2)
    with torch.no_grad():
        model.method.prompt_tb.add_(torch.randn_like(model.method.prompt_tb))
    model.save_task(tmp_path / "t")
    meta = json.loads((tmp_path / "t" / "task.json").read_text())
    assert meta["options"]["prompt_len"] == 2 and meta["data_config"]["input_size"][-1] == SIZE
    loaded = vprompt.load_task(tmp_path / "t", backbone=bb)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(TaskError, match="trained at 32 px"):
        vprompt.load_task(tmp_path / "t", backbone=load_backbone(CNN, img_size=48))


def test_refusals_say_what_to_do(bb, tiny_vit_spec, single_thread):
    with pytest.raises(ConfigError, match=r"ConvNet variant.*'vpt-shallow' or 'vpt-deep'"):
        vprompt.attach(load_backbone(tiny_vit_spec), "vpt-pad", num_classes=2)
    # patches, not a ViT: token-mixing MLPs of a fixed size
    mixer = MlpMixer(num_classes=0, img_size=32, patch_size=16, num_blocks=1, embed_dim=16)
    with pytest.raises(ConfigError, match=r"ConvNet variant.*MlpMixer"):
        vprompt.attach(mixer, "vpt-pad", num_classes=2)
    model = vprompt.attach(bb, "vpt-pad", num_classes=2)
    with pytest.raises(ConfigError, match="resize the images to 32 px"):
        model(torch.randn(1, 3, 40, 40))
    with pytest.raises(ConfigError, match="prompt_len must be an integer >= 1"):
        vprompt.attach(bb, "vpt-pad", num_classes=2, prompt_len=0)
    with pytest.raises(ConfigError, match="init='xavier' is not one of"):
        vprompt.attach(bb, "vpt-pad", num_classes=2, init="xavier")


def test_fit_trains_it_with_the_vpt_recipe(bb, tiny_data_spec, single_thread):
    from vprompt.data import build_splits
    from vprompt.engine.config import TrainConfig
    from vprompt.engine.trainer import fit, fit_config

    splits = build_splits(tiny_data_spec, data_config=bb.data_config, train_size=12)
    model = vprompt.attach(bb, "vpt-pad", num_classes=splits.num_classes, prompt_len=2)
    start = model.method.prompt_lr.detach().clone()
    result = fit(model, splits, {"epochs": 1, "batch_size": 4})
    assert len(result.history) == 1
    assert not torch.equal(model.method.prompt_lr, start)
    cfg = fit_config(model, splits, TrainConfig(epochs=1))
    assert (cfg.optimizer, cfg.lr) == ("sgd", 0.1)  # VPT's SGD recipe, as for its ViT prompts


def test_grad_checkpointing_uses_the_backbones_segments_for_this_forward_only(bb, single_thread):
    """The frame's gradient passes through every layer of the frozen CNN: checkpointing must
    cover the backbone (it did nothing before), with the same gradients, and leave the shared
    backbone's own setting as it was."""
    torch.manual_seed(0)
    model = vprompt.attach(bb, "vpt-pad", num_classes=3, prompt_len=2).double()
    x, y = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64), torch.tensor([0, 2])
    seen: dict[bool, list[bool]] = {False: [], True: []}
    grads = []
    try:
        for enable in (False, True):
            hook = bb.model.layer1[0].register_forward_pre_hook(
                lambda m, a, enable=enable: seen[enable].append(bb.model.grad_checkpointing)
            )
            model.set_grad_checkpointing(enable)
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            grads.append(model.method.prompt_tb.grad.clone())
            hook.remove()
    finally:
        model.set_grad_checkpointing(False)
        model.float()
    assert seen[False] == [False]
    # segments on in the forward, and the block ran again in backward (the recomputation; the
    # flag was already back off by then)
    assert seen[True] == [True, False]
    assert bb.model.grad_checkpointing is False
    torch.testing.assert_close(grads[1], grads[0])
    with torch.no_grad():  # inference: no checkpointing to switch on
        model(x.float())
    assert bb.model.grad_checkpointing is False
