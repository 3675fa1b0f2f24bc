"""VPT shallow/deep on tiny timm ViTs: insertion, counts, frozen backbone, fast == reference."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from vprompt.errors import ConfigError
from vprompt.methods import attach
from vprompt.methods.vpt import embed_tokens

VITS = {
    "vit": {},
    "vit-reg": {"reg_tokens": 3},
    "vit-noclass": {"class_token": False, "global_pool": "avg"},
    "vit-ls-qknorm": {"init_values": 1e-2, "qk_norm": True},
    "vit-dynamic": {"dynamic_img_size": True},
    "vit-noembedclass": {"no_embed_class": True},
}


def tiny_vit(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    base = dict(pretrained=False, num_classes=0, img_size=32, depth=3, embed_dim=48, num_heads=3)
    return timm.create_model("vit_tiny_patch16_224", **{**base, **kw})


@pytest.fixture(params=list(VITS), scope="module")
def vit(request):
    return tiny_vit(**VITS[request.param])


def images(b: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["vpt-shallow", "vpt-deep"])
def test_output_shape_and_trainable_count(vit, name):
    P, C = 5, 7
    model = attach(vit, name, num_classes=C, prompt_len=P)
    assert model(images()).shape == (3, C)
    layers = len(vit.blocks) if name == "vpt-deep" else 1
    head = model.num_features * C + C
    assert model.parameter_report()["trainable"] == layers * P * vit.embed_dim + head
    assert model.parameter_report()["method"] == layers * P * vit.embed_dim


def test_official_uniform_init_bound():
    vit = tiny_vit()
    model = attach(vit, "vpt-deep", num_classes=2, prompt_len=50)
    v = math.sqrt(6.0 / (3 * 16 * 16 + 48))
    p = model.method.prompts
    assert p.abs().max() <= v
    assert p.abs().max() > 0.9 * v  # really spread over the interval, not a narrower init
    assert abs(p.std().item() - v / math.sqrt(3)) < 0.1 * v


def test_vit_b16_init_value_is_0_0625():
    # the DESIGN fact: ViT-B/16 -> v = sqrt(6 / (3 * 256 + 768)) = 0.0625
    assert math.isclose(math.sqrt(6.0 / (3 * 16 * 16 + 768)), 0.0625)


def test_shallow_inserts_after_prefix_without_position_embedding():
    vit = tiny_vit(reg_tokens=2)
    model = attach(vit, "vpt-shallow", num_classes=2, prompt_len=4)
    seen = {}
    vit.blocks[0].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    model.eval()(images(2))
    x = seen["x"]
    tokens = embed_tokens(vit, images(2))  # (B, 1 + 2 + N, D)
    s = vit.num_prefix_tokens
    assert x.shape[1] == tokens.shape[1] + 4
    torch.testing.assert_close(x[:, :s], tokens[:, :s], rtol=0, atol=0)
    torch.testing.assert_close(
        x[:, s : s + 4], model.method.prompts[0].expand(2, -1, -1), rtol=0, atol=0
    )
    torch.testing.assert_close(x[:, s + 4 :], tokens[:, s:], rtol=0, atol=0)


def test_deep_reference_replaces_prompts_before_every_block():
    vit = tiny_vit()
    model = attach(vit, "vpt-deep", num_classes=2, prompt_len=3, fast="off")
    inputs = []
    for blk in vit.blocks:
        blk.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    model.eval()(images(2))
    for i, x in enumerate(inputs):
        torch.testing.assert_close(
            x[:, 1:4], model.method.prompts[i].expand(2, -1, -1), rtol=0, atol=0
        )


@pytest.mark.parametrize("prompt_len", [1, 4, 20])
@pytest.mark.parametrize("pool", ["auto", "patch-mean", "cls+patch-mean"])
def test_fast_path_equals_reference(vit, prompt_len, pool):
    if pool.startswith("cls") and vit.cls_token is None:
        pytest.skip("no class token")
    fast = attach(vit, "vpt-deep", num_classes=4, prompt_len=prompt_len, pool=pool)
    ref = attach(vit, "vpt-deep", num_classes=4, prompt_len=prompt_len, pool=pool, fast="off")
    assert fast.method.fast_path and not ref.method.fast_path
    ref.load_task_state_dict(fast.task_state_dict())
    x = images(4)
    fast.train()
    ref.train()
    y_fast, y_ref = fast(x), ref(x)
    assert (y_fast - y_ref).abs().max() <= 1e-5
    target = torch.tensor([0, 1, 2, 3])
    F.cross_entropy(y_fast, target).backward()
    F.cross_entropy(y_ref, target).backward()
    g_fast, g_ref = fast.method.prompts.grad, ref.method.prompts.grad
    assert g_ref.abs().max() > 0
    assert (g_fast - g_ref).abs().max() <= 1e-5 * max(1.0, g_ref.abs().max().item())


def test_fast_path_with_prompt_dropout_and_projection_matches_in_eval():
    vit = tiny_vit()
    kw = dict(num_classes=3, prompt_len=6, prompt_dropout=0.1, project=16)
    fast = attach(vit, "vpt-deep", **kw)
    ref = attach(vit, "vpt-deep", fast="off", **kw)
    ref.load_task_state_dict(fast.task_state_dict())
    x = images(2)
    assert (fast.eval()(x) - ref.eval()(x)).abs().max() <= 1e-5
    fast.train()
    a, b = fast(x), fast(x)
    assert not torch.equal(a, b), "prompt dropout must be active in training"


def test_only_prompts_and_head_get_gradients_and_backbone_is_unchanged(vit):
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    model = attach(vit, "vpt-deep", num_classes=3, prompt_len=4)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5, momentum=0.9)
    model.train()
    for _ in range(3):
        loss = F.cross_entropy(model(images(3)), torch.tensor([0, 1, 2]))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in vit.parameters())
        assert model.method.prompts.grad.abs().sum() > 0
        opt.step()
    for k, v in vit.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not vit.training, "a frozen backbone stays in inference mode"
    names = {n for n, _ in model.named_trainable_parameters()}
    assert names == {"method.prompts", "head.fc.weight", "head.fc.bias"}


def test_task_state_dict_holds_only_method_and_head():
    model = attach(tiny_vit(), "vpt-deep", num_classes=3, prompt_len=4)
    keys = set(model.task_state_dict())
    assert "method.prompts" in keys
    assert all(k.startswith(("method.", "head.")) for k in keys)


def test_all_mean_pool_uses_reference_path_and_counts_prompts():
    vit = tiny_vit(class_token=True)
    model = attach(vit, "vpt-deep", num_classes=2, prompt_len=5, pool="all-mean")
    assert not model.method.fast_path
    feats = model.forward_features(images(2))
    assert feats.shape[1] == 1 + 5 + 4  # CLS, prompts, 2x2 patches
    torch.testing.assert_close(model.pool(feats), feats[:, 1:].mean(1))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prompt_len": 0}, "prompt_len must be a positive integer"),
        ({"prompt_len": -3}, "prompt_len must be a positive integer"),
        ({"pool": "all-mean", "fast": "on"}, "all-mean"),
        ({"project": 0}, "project must be -1"),
        ({"prompt_dropout": 1.5}, "prompt_dropout"),
        ({"init": "xavier"}, "init='xavier' is not one of"),
        ({"pool": "max"}, "pool='max' is not one of"),
        ({"nonsense": 1}, "has no option"),
    ],
)
def test_config_rejects_contradictions(options, message):
    with pytest.raises(ConfigError, match=message):
        attach(tiny_vit(), "vpt-deep", num_classes=2, **options)


def test_shallow_rejects_fast_on_and_cnn_backbones():
    with pytest.raises(ConfigError, match="deep prompts only"):
        attach(tiny_vit(), "vpt-shallow", num_classes=2, fast="on")
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    with pytest.raises(ConfigError, match="VisionTransformer"):
        attach(cnn, "vpt-deep", num_classes=2)


def test_grad_checkpointing_gives_same_gradients():
    vit = tiny_vit()
    a = attach(vit, "vpt-deep", num_classes=2, prompt_len=3)
    b = attach(vit, "vpt-deep", num_classes=2, prompt_len=3)
    b.load_task_state_dict(a.task_state_dict())
    b.set_grad_checkpointing(True)
    x, y = images(2), torch.tensor([0, 1])
    for m in (a, b):
        m.train()
        F.cross_entropy(m(x), y).backward()
    torch.testing.assert_close(a.method.prompts.grad, b.method.prompts.grad)
