"""Pro-tuning prompt blocks on tiny random timm CNNs and ViTs."""

from __future__ import annotations

import copy
import functools
import threading

import pytest
import timm
import torch
from torch import nn

import vprompt.methods.pro_tuning  # noqa: F401  (registers pro-tuning)
from vprompt.errors import ConfigError
from vprompt.methods.pro_tuning import ProTuningConfig
from vprompt.methods.registry import attach

NUM_CLASSES = 5
VIT = {"depth": 4, "embed_dim": 64, "num_heads": 2, "img_size": 32, "patch_size": 8}

# name -> (timm architecture, create kwargs, image size, pro-tuning options)
BACKBONES: dict[str, tuple[str, dict, int, dict]] = {
    "vit": ("vit_tiny_patch16_224", VIT, 32, {"vit_groups": 2}),
    "vit-reg-dynamic": (
        "vit_tiny_patch16_224",
        {
            **VIT,
            "reg_tokens": 2,
            "dynamic_img_size": True,
            "class_token": False,
            "global_pool": "avg",
        },
        40,
        {"vit_groups": 4},
    ),
    # EVA-02 (rotary embeddings, SwiGLU; not a timm VisionTransformer): grouped like a ViT
    "eva": ("eva02_tiny_patch14_224", {"img_size": 28, "depth": 4}, 28, {"vit_groups": 2}),
    "resnet": ("resnet10t", {}, 64, {}),
    "efficientnet": ("tf_efficientnet_lite0", {}, 64, {"stages": (2, 3, 4)}),
    "convnext": ("convnext_atto", {}, 64, {"norm": "gn"}),
}
# Sites pro-tuning picks for each case, and their channels.
SITES = {
    "vit": [("blocks.0", 64), ("blocks.2", 64)],  # before each group of two blocks
    "vit-reg-dynamic": [(f"blocks.{i}", 64) for i in range(4)],
    "eva": [("blocks.0", 192), ("blocks.2", 192)],
    "resnet": [("layer1", 64), ("layer2", 128), ("layer3", 256), ("layer4", 512)],
    "efficientnet": [("blocks.2", 40), ("blocks.4", 112), ("blocks.6", 320)],
    "convnext": [("stages.0", 40), ("stages.1", 80), ("stages.2", 160), ("stages.3", 320)],
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest single-threaded (and do not fight other test processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _created(name: str) -> nn.Module:
    arch, kwargs, _, _ = BACKBONES[name]
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs).eval()


def make(name: str, **options):
    """(caller's frozen backbone, attached pro-tuning model)."""
    backbone = copy.deepcopy(_created(name))
    return backbone, attach(
        backbone, "pro-tuning", num_classes=NUM_CLASSES, **{**BACKBONES[name][3], **options}
    )


def images(name: str, b: int = 4, seed: int = 1, size: int | None = None) -> torch.Tensor:
    s = size or BACKBONES[name][2]
    return torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(seed))


def sgd_steps(model: nn.Module, x: torch.Tensor, steps: int = 1, lr: float = 0.5) -> None:
    opt = torch.optim.SGD(model.trainable_parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), torch.arange(len(x)) % NUM_CLASSES).backward()
        opt.step()
    model.eval()


def perturb(model) -> None:
    """Give every prompt block's zero-initialised output layer non-zero weights."""
    torch.manual_seed(3)
    with torch.no_grad():
        for block in model.method.blocks:
            block.expand.weight.normal_(0, 0.5)
            block.expand.bias.normal_(0, 0.5)


def hidden(c: int, reduction: int = 4) -> int:
    return max(c // reduction, min(8, c))


def block_params(c: int, reduction: int = 4, k: int = 3, norm: str = "bn") -> int:
    """reduce (C*h, +h bias without a norm) + norm (2h) + depthwise (h*k*k + h) + expand (h*C + C)."""
    h = hidden(c, reduction)
    return 2 * c * h + h * (k * k + 1) + c + (h if norm == "none" else 2 * h)


CASES = list(BACKBONES)


@pytest.mark.parametrize("bb", CASES)
def test_sites_and_parameter_count(bb):
    _, model = make(bb)
    assert (
        list(zip(model.method.site_modules, model.method.site_channels, strict=True)) == SITES[bb]
    )
    norm = BACKBONES[bb][3].get("norm", "bn")
    expected = sum(block_params(c, norm=norm) for _, c in SITES[bb])
    report = model.parameter_report()
    assert report["method"] == expected
    assert report["trainable"] == expected + sum(p.numel() for p in model.head.parameters())
    assert model(images(bb)).shape == (4, NUM_CLASSES)


@pytest.mark.parametrize("bb", CASES)
def test_init_is_the_frozen_backbone_then_training_moves_it(bb):
    backbone, model = make(bb)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    x = images(bb)
    with torch.no_grad():
        frozen = backbone.forward_features(x)
        assert torch.equal(model.forward_features(x), frozen)

    sgd_steps(model, x)
    with torch.no_grad():
        assert not torch.equal(model.forward_features(x), frozen)
        assert torch.equal(backbone.forward_features(x), frozen), "hooks leaked into the backbone"
    assert model.backbone is backbone
    for k, v in backbone.state_dict().items():  # weights and batch-norm statistics
        assert torch.equal(v, before[k]), f"frozen {k} changed"
    assert not any(m._forward_hooks for m in backbone.modules())


@pytest.mark.parametrize("bb", CASES)
def test_gradients_go_only_to_prompt_blocks_and_head(bb):
    backbone, model = make(bb)
    perturb(model)  # so every layer of the blocks is on the gradient path
    model.train()
    nn.functional.cross_entropy(model(images(bb)), torch.arange(4) % NUM_CLASSES).backward()
    assert all(p.grad is None for p in backbone.parameters())
    for name, p in [*model.method.named_parameters(), *model.head.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not list(model.method.backbone_parameters(backbone))


@pytest.mark.parametrize("bb", CASES)
def test_task_state_round_trip(bb):
    _, model = make(bb)
    sgd_steps(model, images(bb), steps=2)
    _, fresh = make(bb)
    fresh.load_task_state_dict(model.task_state_dict())
    x = images(bb, seed=5)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_train_mode_backbone_stays_at_inference():
    torch.manual_seed(0)
    backbone = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, drop_path_rate=0.5, **VIT
    )
    model = attach(backbone, "pro-tuning", num_classes=NUM_CLASSES, vit_groups=2, norm="gn")
    perturb(model)
    x = images("vit")
    with torch.no_grad():
        model.eval()
        reference = model.forward_features(x)
        model.train()
        assert not any(m.training for m in model.backbone.modules())
        assert torch.equal(model.forward_features(x), reference)


def test_dynamic_image_size_and_prefix_tokens():
    """Another grid size works; with one group the prompt lands after the last block, so the
    prefix (register) outputs are untouched and only the patch tokens change."""
    backbone, model = make("vit-reg-dynamic", vit_groups=1, vit_position="after")
    assert model.method.site_modules == ["blocks.3"]
    perturb(model)
    x = images("vit-reg-dynamic", size=48)  # 6x6 grid instead of 4x4 (+ 2 register tokens)
    with torch.no_grad():
        out, frozen = model.forward_features(x), backbone.forward_features(x)
    assert out.shape == (4, 2 + 36, 64)
    assert torch.equal(out[:, :2], frozen[:, :2])
    assert not torch.equal(out[:, 2:], frozen[:, 2:])


def test_channels_last_stage_maps():
    """timm Swin stages are (B, H, W, C): the prompt is added along the last dimension."""
    torch.manual_seed(0)
    backbone = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        window_size=4,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 1),
    )
    model = attach(backbone, "pro-tuning", num_classes=NUM_CLASSES, stages=(0,))
    assert model.method.site_layouts == ["NHWC"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), backbone.forward_features(x))
        bias = model.method.blocks[0].expand.bias
        bias.copy_(torch.arange(bias.numel(), dtype=bias.dtype))  # prompt = channel index

        seen: list[torch.Tensor] = []
        handle = backbone.layers[1].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        backbone.forward_features(x)
        model.forward_features(x)
        handle.remove()
    plain, prompted = seen
    assert prompted.shape == plain.shape == (2, 8, 8, 16)  # (B, H, W, C)
    torch.testing.assert_close(prompted - plain, bias.detach().expand_as(plain))


def test_hooks_act_only_in_the_calling_thread_and_are_removed():
    backbone, model = make("resnet")
    perturb(model)
    x = images("resnet", b=2)
    with torch.no_grad():
        frozen = backbone.forward_features(x)
        other: dict[str, torch.Tensor] = {}
        with model.method.prompts_active(backbone, x):
            worker = threading.Thread(
                target=lambda: other.setdefault("y", backbone.forward_features(x))
            )
            worker.start()
            worker.join()
            mine = backbone.forward_features(x)
    assert torch.equal(other["y"], frozen)
    assert not torch.equal(mine, frozen)
    assert not any(m._forward_hooks for m in backbone.modules())
    with pytest.raises(RuntimeError), torch.no_grad():
        model.forward_features(images("resnet", size=64)[:, :2])  # wrong channel count
    assert not any(m._forward_hooks for m in backbone.modules()), "hooks left after an error"


def test_rejects_stage_out_of_range_with_listing():
    with pytest.raises(ConfigError) as err:
        make("resnet", stages=(1, 7))
    message = str(err.value)
    assert "stages [7] out of range" in message
    assert "5 stages" in message
    assert "0: act1 (64 ch, stride 2)" in message and "4: layer4 (512 ch, stride 32)" in message
    with pytest.raises(ConfigError, match=r"stages \[2\] out of range.*0: before blocks 0-1"):
        make("vit", stages=(2,))


def test_rejects_backbones_without_stages():
    with pytest.raises(ConfigError, match="no timm `feature_info`"):
        attach(nn.Linear(4, 4), "pro-tuning", num_classes=NUM_CLASSES)
    with pytest.raises(ConfigError, match="no timm `feature_info`"):
        attach(nn.Sequential(nn.Conv2d(3, 8, 3)), "pro-tuning", num_classes=NUM_CLASSES)
    with pytest.raises(ConfigError, match="vit_groups=8 but the ViT has only 4 blocks"):
        make("vit", vit_groups=8)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"reduction": 0}, "reduction must be an integer >= 1"),
        ({"reduction": 2.0}, "reduction must be an integer, got 2.0"),
        ({"kernel_size": 4}, "kernel_size must be odd"),
        ({"vit_groups": 0}, "vit_groups must be an integer >= 1"),
        ({"stages": ()}, "stages is empty"),
        ({"stages": (1, -1)}, "non-negative integers"),
        ({"stages": (1, 1)}, "repeats"),
        ({"stages": 1.5}, "list of stage indices"),
        ({"norm": "ln"}, "norm='ln' is not one of"),
        ({"fuse": "concat"}, "fuse='concat' is not one of"),
    ],
)
def test_config_rejections(options, match):
    with pytest.raises(ConfigError, match=match):
        ProTuningConfig(**options)


def test_config_round_trips_through_json_lists():
    config = ProTuningConfig.from_dict({"stages": [3, 1], "reduction": 8})
    assert config.stages == (1, 3)
    assert ProTuningConfig.from_dict(config.to_dict()) == config


def test_grad_checkpointing_is_refused():
    backbone, model = make("vit")
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        model.set_grad_checkpointing(True)
    backbone.set_grad_checkpointing(True)
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        model(images("vit"))
    assert not any(m._forward_hooks for m in backbone.modules())


def test_vit_position_after_and_class_token_heads():
    """'after' prompts the output of each group; after the last block only patch poolings see it."""
    _, model = make("vit", vit_position="after", pool="cls+patch-mean")
    assert model.method.site_modules == ["blocks.1", "blocks.3"]
    with pytest.raises(ConfigError, match=r"\(pool='cls'\) never reads.*cls\+patch-mean"):
        make("vit", vit_position="after")  # the tiny ViT pools its class token
    _, model = make("vit", vit_position="after", stages=(0,))  # last group left out: fine
    assert model.method.site_modules == ["blocks.1"]
    _, model = make("eva", vit_position="after")  # EVA-02 averages its patch tokens: read
    assert model.method.site_modules == ["blocks.1", "blocks.3"]
    eva_cls = copy.deepcopy(_created("eva"))
    eva_cls.global_pool = "token"
    with pytest.raises(ConfigError, match=r"never reads.*global_pool='avg'"):
        attach(eva_cls, "pro-tuning", num_classes=NUM_CLASSES, vit_groups=2, vit_position="after")


def test_vit_before_prompts_the_patch_embeddings():
    backbone, model = make("vit", stages=(0,))
    perturb(model)
    x = images("vit")
    seen: list[torch.Tensor] = []
    handle = backbone.blocks[0].register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        backbone.forward_features(x)
        model.forward_features(x)
    handle.remove()
    plain, prompted = seen  # (B, 1 + 16, D) entering block 0
    assert torch.equal(prompted[:, :1], plain[:, :1])  # class token untouched
    assert not torch.equal(prompted[:, 1:], plain[:, 1:])
