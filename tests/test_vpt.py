"""VPT shallow/deep on tiny timm ViTs: insertion, counts, frozen backbone, fast == reference."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from vprompt.errors import ConfigError
from vprompt.methods import attach, vpt
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


def test_cls_plus_patch_mean_applies_the_backbones_fc_norm_to_each_half():
    """An avg-pooled ViT keeps its final norm in ``fc_norm`` (``norm`` is Identity): both the
    class token and the patch mean go through it, as each would alone."""
    vit = tiny_vit(class_token=True, global_pool="avg", fc_norm=True)
    assert isinstance(vit.norm, torch.nn.Identity)
    with torch.no_grad():  # a visible affine part, so a skipped norm cannot pass
        vit.fc_norm.weight.uniform_(0.5, 2.0)
        vit.fc_norm.bias.uniform_(-1.0, 1.0)
    model = attach(vit, "vpt-deep", num_classes=2, prompt_len=3, pool="cls+patch-mean")
    x = images(2)
    feats = model.forward_features(x)
    cls, mean = feats[:, 0], feats[:, model.num_prefix_tokens :].mean(1)
    want = torch.cat([vit.fc_norm(cls), vit.fc_norm(mean)], dim=-1)
    torch.testing.assert_close(
        model.forward_head(feats, pre_logits=True), model.head.drop(model.head.norm(want))
    )


def test_attention_pooled_vit_needs_an_explicit_pool():
    vit = tiny_vit(class_token=False, global_pool="map")
    with pytest.raises(ConfigError, match=r"attention pool.*pool='patch-mean'"):
        attach(vit, "vpt-deep", num_classes=2)
    assert attach(vit, "vpt-deep", num_classes=2, pool="patch-mean").pool_type == "patch-mean"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prompt_len": 0}, "prompt_len must be a positive integer"),
        ({"prompt_len": -3}, "prompt_len must be a positive integer"),
        ({"pool": "all-mean", "fast": "on"}, "all-mean"),
        ({"project": 0}, "project must be -1"),
        ({"prompt_len": True}, "prompt_len must be an integer, got True"),
        ({"project": 5.5}, "project must be an integer, got 5.5"),
        ({"head_norm": "no"}, "head_norm must be true or false"),
        ({"prompt_dropout": "0.1"}, "prompt_dropout must be a number"),
        ({"prompt_dropout": 1.5}, "prompt_dropout"),
        ({"init": "xavier"}, "init='xavier' is not one of"),
        ({"pool": "max"}, "pool='max' is not one of"),
        (
            {"nonsense": 1},
            r"has no option\(s\) \['nonsense'\]; its options are \[[^]]*\] \(see `vprompt methods`\)$",
        ),
        ({"seed": 3}, r"also name training options.*\(--seed\)"),  # --set seed=3 on VPT
    ],
)
def test_config_rejects_contradictions(options, message):
    with pytest.raises(ConfigError, match=message):
        attach(tiny_vit(), "vpt-deep", num_classes=2, **options)


def test_int_for_a_float_option_becomes_a_float():
    model = attach(tiny_vit(), "vpt-deep", num_classes=2, prompt_dropout=0, head_dropout=0)
    assert type(model.config.prompt_dropout) is float and type(model.config.head_dropout) is float


@pytest.mark.parametrize(
    ("num_classes", "names", "message"),
    [
        (2, ["cat", "cat"], r"distinct.*\['cat'\]"),
        (2, ["cat"], "1 class names given for num_classes=2"),
        (2, ["cat", 3], "must be strings"),
        (0, None, "num_classes must be an integer >= 2"),
        (1, None, "num_classes must be an integer >= 2"),
    ],
)
def test_class_names_are_checked_at_attach_and_reset(num_classes, names, message):
    with pytest.raises(ConfigError, match=message):
        attach(tiny_vit(), "vpt-deep", num_classes=num_classes, class_names=names)
    model = attach(tiny_vit(), "vpt-deep", num_classes=3)
    with pytest.raises(ConfigError, match=message):
        model.reset_classifier(num_classes, names)
    assert model.class_names == ["0", "1", "2"]  # unchanged by the refused reset


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


# ------------------------------------------------------------------ split-backward attention
def _qkv_and_prompts(B: int, H: int, T: int, P: int, hd: int = 8, *, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(B, T, 3, H, hd, generator=g, dtype=dtype, requires_grad=True)
    pkv = torch.randn(1, P, 2, H, hd, generator=g, dtype=dtype, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hd), as timm lays them out
    pk, pv = pkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (1, H, P, hd)
    return qkv, pkv, (q, k, v, pk, pv)


@pytest.mark.parametrize("P", [1, 7, 30])
@pytest.mark.parametrize("image_grad", [True, False])
@pytest.mark.parametrize("slab_bytes", [None, 1])  # default slab, and one head per group
def test_split_backward_attention_equals_sdpa_over_concatenation(
    monkeypatch, P, image_grad, slab_bytes
):
    if slab_bytes is not None:
        monkeypatch.setattr(vpt, "_SLAB_BYTES", slab_bytes)
    B, H, T, hd = 3, 4, 9, 8
    qkv, pkv, (q, k, v, pk, pv) = _qkv_and_prompts(B, H, T, P, hd)
    qkv.requires_grad_(image_grad)
    do = torch.randn(B, T, H, hd, dtype=torch.float64).transpose(1, 2)  # as the block's backward
    ref = F.scaled_dot_product_attention(
        q, torch.cat([pk.expand(B, -1, -1, -1), k], 2), torch.cat([pv.expand(B, -1, -1, -1), v], 2)
    )
    out = vpt.PromptKVAttention.apply(q, k, v, pk, pv, hd**-0.5)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    inputs = (qkv, pkv) if image_grad else (pkv,)
    grads = torch.autograd.grad(out, inputs, do), torch.autograd.grad(ref, inputs, do)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_split_backward_is_chosen_only_where_exact_and_useful(monkeypatch):
    B, H, T = 2, 3, 5
    _, _, (q, _, _, pk, pv) = _qkv_and_prompts(B, H, T, P=T, dtype=torch.float32)
    choose = vpt.use_split_backward
    assert choose(q, pk, pv, None, 0.0)  # P >= T, everything needs gradients
    mask = torch.ones(B, 1, 1, T + T, dtype=torch.bool)
    assert not choose(q, pk, pv, mask, 0.0)  # serving with padded prompt lengths
    assert not choose(q, pk, pv, None, 0.1)  # attention dropout in training
    per_sample = pk.expand(B, -1, -1, -1)  # prompt dropout: one prompt set per sample
    assert not choose(q, per_sample, per_sample, None, 0.0)
    assert not choose(q.bfloat16(), pk, pv, None, 0.0)
    with torch.no_grad():
        assert not choose(q, pk, pv, None, 0.0)  # inference: fused SDPA is faster
    _, _, (q, _, _, pk_short, pv_short) = _qkv_and_prompts(B, H, T, P=1, dtype=torch.float32)
    assert choose(q, pk_short, pv_short, None, 0.0)  # P < T: saves memory all the same
    assert choose(q.detach(), pk_short, pv_short, None, 0.0)  # first block: no image gradients
    assert not choose(q, pk.detach(), pv.detach(), None, 0.0)  # nothing of the prompts trains
    monkeypatch.setattr(vpt, "_HAS_CPU_FLASH", False)  # a torch without the private CPU ops
    assert not choose(q, pk, pv, None, 0.0)


def _count_split_calls(monkeypatch) -> list[int]:
    calls = []
    apply = vpt.PromptKVAttention.apply
    monkeypatch.setattr(
        vpt.PromptKVAttention, "apply", lambda *a: calls.append(1) or apply(*a), raising=True
    )
    return calls


def test_attention_dropout_keeps_fused_sdpa_with_dropout(monkeypatch):
    calls = _count_split_calls(monkeypatch)
    vit = tiny_vit(attn_drop_rate=0.5)
    model = attach(vit, "vpt-deep", num_classes=2, prompt_len=20)
    ref = attach(vit, "vpt-deep", num_classes=2, prompt_len=20, fast="off")
    ref.load_task_state_dict(model.task_state_dict())
    vit.train()  # the frozen backbone normally stays in eval; force its attention dropout on
    x = images(2)
    a, b = model.method.forward_features(vit, x), model.method.forward_features(vit, x)
    assert not torch.equal(a, b), "attention dropout must be active"
    assert calls == []
    vit.eval()
    assert (model.eval()(x) - ref.eval()(x)).abs().max() <= 1e-5


def test_prompt_dropout_in_training_keeps_fused_sdpa(monkeypatch):
    calls = _count_split_calls(monkeypatch)
    model = attach(tiny_vit(), "vpt-deep", num_classes=2, prompt_len=20, prompt_dropout=0.1)
    F.cross_entropy(model.train()(images(2)), torch.tensor([0, 1])).backward()
    assert calls == [] and model.method.prompts.grad.abs().sum() > 0


def test_split_backward_used_in_every_block_in_training_only(monkeypatch):
    calls = _count_split_calls(monkeypatch)
    vit = tiny_vit()  # 5 image tokens (CLS + 2x2 patches), 3 blocks
    for P in (20, 2):  # more and fewer prompts than tokens
        calls.clear()
        model = attach(vit, "vpt-deep", num_classes=2, prompt_len=P)
        F.cross_entropy(model.train()(images(2)), torch.tensor([0, 1])).backward()
        assert len(calls) == 3, P
        calls.clear()
        with torch.no_grad():
            model.eval()(images(2))
        assert calls == []


def test_masked_padded_prompts_equal_unpadded_with_gradients():
    # serving pads prompt K/V to a common length and masks the padding; the block must then give
    # what it gives for the real prompts alone (fused SDPA takes the mask; without the mask and
    # with P >= T the split backward runs)
    vit = tiny_vit()
    block = vit.blocks[1]
    P, pad, B = 6, 4, 2
    x = embed_tokens(vit, images(B)).requires_grad_(True)  # (B, T, D)
    T = x.shape[1]
    prompts = torch.randn(P, vit.embed_dim, requires_grad=True)
    pk, pv = vpt.prompt_kv(block, prompts)  # (1, H, P, hd)
    padded = [F.pad(t, (0, 0, 0, pad)) for t in (pk, pv)]  # (1, H, P + pad, hd)
    mask = torch.ones(B, 1, 1, P + pad + T, dtype=torch.bool)
    mask[..., P : P + pad] = False
    out = vpt.block_with_prompt_kv(block, x, *padded, attn_mask=mask)
    ref = vpt.block_with_prompt_kv(block, x, pk, pv)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    g = torch.randn_like(out)
    grads = (
        torch.autograd.grad(out, (x, prompts), g, retain_graph=True),
        torch.autograd.grad(ref, (x, prompts), g),
    )
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_fused_path_does_not_keep_the_qkv_buffer_for_backward():
    """With per-sample prompts (prompt dropout: fused SDPA over copied K/V), what the block saves
    for backward must not include the (3, B, H, T, hd) qkv output: q gets its own copy."""
    model = tiny_vit()
    block = model.blocks[1]
    x = torch.randn(2, 17, model.embed_dim, requires_grad=True)  # tokens that need gradients
    prompts = torch.randn(2, 3, model.embed_dim, requires_grad=True)  # (B, P, D): per sample
    pk, pv = vpt.prompt_kv(block, prompts)
    assert not vpt.use_split_backward(x[:, None], pk, pv, None, 0.0)
    qkv_bytes = 3 * x.numel() * x.element_size()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = vpt.block_with_prompt_kv(block, x, pk, pv)
    assert qkv_bytes not in saved.values()
    out.sum().backward()  # the copy still gives gradients
    assert x.grad is not None and prompts.grad is not None


def test_class_token_pool_runs_the_last_block_on_the_class_token_alone():
    # float64: the head's batch norm over 2 images amplifies float32 rounding in the gradients
    vit = tiny_vit(reg_tokens=2).double()
    model = attach(vit, "vpt-deep", num_classes=3, prompt_len=4).double()
    ref = attach(vit, "vpt-deep", num_classes=3, prompt_len=4, fast="off").double()
    ref.load_task_state_dict(model.task_state_dict())
    assert model.pool_type == "cls"
    mlp_rows: list[int] = []
    hooks = [
        b.mlp.register_forward_hook(lambda m, i, o: mlp_rows.append(i[0].shape[1]))
        for b in vit.blocks
    ]
    x = images(2).double()
    logits = model.train()(x)
    for h in hooks:
        h.remove()
    tokens = embed_tokens(vit, x).shape[1]  # CLS + 2 registers + 4 patches
    assert mlp_rows == [tokens, tokens, 1]  # the last block's MLP sees the class token only
    # forward_features (timm's surface) still returns every token, and both agree with the
    # reference path on the class token
    feats = model.forward_features(x)
    assert feats.shape[1] == tokens
    torch.testing.assert_close(model.forward_head(feats), logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(ref.train()(x), logits, rtol=0, atol=1e-10)
    target = torch.tensor([0, 2])
    F.cross_entropy(logits, target).backward()
    F.cross_entropy(ref(x), target).backward()
    g, g_ref = model.method.prompts.grad, ref.method.prompts.grad
    assert g_ref.abs().max() > 0
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10)
