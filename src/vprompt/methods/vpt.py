"""VPT: Visual Prompt Tuning (Jia et al., ECCV 2022), shallow and deep, on timm ViTs.

Token layout inside the blocks: ``[prefix (CLS, registers), prompts (P), patches (N)]``. Prompts
are inserted after the position embedding is added, so they carry no position embedding.

Two execution paths compute the same logits for VPT-deep:

* reference: the P prompt tokens go through every block like any other token; before block
  i >= 1 their outputs are thrown away and replaced by block i's prompts.
* fast (default where exact): since the prompt outputs are thrown away, a block only needs the
  prompts' keys and values, and since prompts do not depend on the image these are computed once
  per forward for the whole batch. The image tokens attend to ``[prompt K/V, own K/V]`` through
  fused scaled-dot-product attention; queries, attention outputs and MLP run for image tokens
  only. In training on CPU the attention backward is split into an image part (the flash
  backward over the T image keys) and a prompt part (plain matmuls with the batch folded into
  the query rows), see `PromptKVAttention`; no concatenated K/V are kept for backward, so memory
  does not grow with P. What is left of the cost of P is the arithmetic of attending to P more
  keys (about 14 * B * T * P * D flops per block, forward plus backward). A model pooled by its
  class token runs the last block for that token's row alone (`VPT.forward_first_token`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from vprompt.errors import ConfigError
from vprompt.methods.base import Method, MethodConfig, check_choice
from vprompt.methods.registry import register_method

PromptInit = Literal["uniform", "normal", "zeros"]
"""``uniform``: the official U(-v, v), v = sqrt(6 / (3 * patch_h * patch_w + prompt_dim)).
``normal``: N(0, 0.02). ``zeros``: all zero (a control)."""

FastPath = Literal["auto", "on", "off"]


@dataclass
class VPTConfig(MethodConfig):
    """VPT options.

    Attributes:
        prompt_len: prompt tokens P (per block for deep).
        init: how prompts start (see `PromptInit`).
        project: if > 0, prompts live in this many dimensions and a shared linear layer maps them
            to the model width (the official ``PROJECT`` option); -1 for none.
        prompt_dropout: dropout on the prompt tokens (official default 0.0; 0.1 in released runs).
        fast: VPT-deep fast path: ``auto`` uses it where exact, ``on`` requires it, ``off`` runs the
            reference path. Ignored (reference) for shallow.
    """

    name: ClassVar[str] = "vpt"
    deep: ClassVar[bool] = False
    prompt_len: int = 10
    init: PromptInit = "uniform"
    project: int = -1
    prompt_dropout: float = 0.0
    fast: FastPath = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "init", PromptInit)
        check_choice(self, "fast", FastPath)
        if self.prompt_len < 1:  # an integer: check_field_types
            raise ConfigError(
                f"{self.name}: prompt_len must be a positive integer, got {self.prompt_len!r}"
            )
        if self.project == 0 or self.project < -1:
            raise ConfigError(
                f"{self.name}: project must be -1 (no projection) or > 0, got {self.project}"
            )
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ConfigError(
                f"{self.name}: prompt_dropout must be in [0, 1), got {self.prompt_dropout}"
            )
        if self.fast == "on" and not self.deep:
            raise ConfigError(
                f"{self.name}: the fast path exists for deep prompts only; use fast='auto'"
            )
        if self.fast == "on" and self.pool == "all-mean":
            raise ConfigError(
                f"{self.name}: pool='all-mean' averages the prompt outputs, which the fast path never "
                "computes; use fast='off' (or 'auto') or another pool"
            )


@dataclass
class VPTShallowConfig(VPTConfig):
    """VPT-shallow: P prompts in front of the first block only."""

    name: ClassVar[str] = "vpt-shallow"
    deep: ClassVar[bool] = False
    fast: Literal["auto", "off"] = "auto"  # the fast path is for deep prompts ('on' refused)


@dataclass
class VPTDeepConfig(VPTConfig):
    """VPT-deep: a separate set of P prompts for every block."""

    name: ClassVar[str] = "vpt-deep"
    deep: ClassVar[bool] = True


def check_vit(backbone: nn.Module, method: str) -> VisionTransformer:
    if not isinstance(backbone, VisionTransformer):
        raise ConfigError(
            f"{method} needs a timm VisionTransformer backbone, got {type(backbone).__name__}; "
            "for CNNs use 'pro-tuning' or a baseline"
        )
    return backbone


def supports_fast_path(block: nn.Module) -> bool:
    """The fast path re-implements timm's pre-norm `Block` with standard `Attention` exactly."""
    return type(block) is Block and type(block.attn) is Attention


def embed_tokens(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Images -> tokens entering the first block: (B, prefix + N, D)."""
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def prompt_kv(block: Block, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of prompt tokens in one block.

    Args:
        block: a timm `Block` with standard `Attention`.
        prompts: (P, D) shared by the batch, or (B, P, D) per sample.

    Returns:
        Keys and values, each (1 or B, H, P, head_dim).
    """
    attn = block.attn
    p = prompts if prompts.ndim == 3 else prompts.unsqueeze(0)  # (B|1, P, D)
    b, n, _ = p.shape
    qkv = attn.qkv(block.norm1(p)).reshape(b, n, 3, attn.num_heads, attn.head_dim)
    _, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B|1, H, P, hd)
    return attn.k_norm(k), v


_HAS_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
"""The split backward calls torch's CPU flash-attention ops directly (private; checked, not assumed)."""
_LOG2E = math.log2(math.e)
_SLAB_BYTES = 2 << 20
"""Prompt scores are recomputed in backward one group of heads at a time, each group's
(heads, B * T, P) slab about this size, so that it stays in cache between the matmuls."""


def use_split_backward(
    q: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout: float,
) -> bool:
    """Whether `PromptKVAttention` runs for this block, and not plain fused SDPA.

    Wherever it is exact and there is a backward: prompt keys/values shared by the batch (not
    per-sample prompt dropout), no mask (serving pads prompt lengths), no attention dropout, CPU
    fp32/fp64 (it calls the CPU flash kernels; in half precision its matmuls would round
    differently), gradients enabled and wanted for the prompts. It saves less for backward than
    fused SDPA over the concatenated keys (no (B, H, P + T, hd) K/V copies, no separate copy of
    q) at every prompt length; its step time is within noise of the fused path where the prompts
    are fewer than the tokens (ViT-B/16, 224 px, P = 10 and 50) and shorter from P >= T, and when
    the image queries need no gradient (the first block) it skips their backward. Forward-only
    runs keep fused SDPA.
    """
    if attn_mask is not None or dropout > 0.0 or pk.shape[0] != 1 or not _HAS_CPU_FLASH:
        return False
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64):
        return False
    return torch.is_grad_enabled() and (pk.requires_grad or pv.requires_grad)


def _fold_batch(t: torch.Tensor) -> torch.Tensor:
    """(B, H, T, X) -> contiguous (H, B * T, X): the batch folded into the rows."""
    B, H, T, X = t.shape
    return t.transpose(0, 1).reshape(H, B * T, X).contiguous()


def _unfold_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """(H, B * T, X) -> (B, H, T, X), a view."""
    H, BT, X = t.shape
    return t.view(H, batch, BT // batch, X).transpose(0, 1)


def _head_groups(heads: int, rows: int, prompts: int) -> list[slice]:
    per = max(1, min(heads, _SLAB_BYTES // max(1, 4 * rows * prompts)))
    return [slice(h, min(heads, h + per)) for h in range(0, heads, per)]


class PromptKVAttention(torch.autograd.Function):
    """``scaled_dot_product_attention(q, cat([pk, k]), cat([pv, v]))`` for prompt keys/values
    (1, H, P, hd) shared by the batch, with a backward that splits prompt and image keys.

    Forward: the CPU flash kernel over the concatenation, which also returns the log-sum-exp
    over all P + T keys; the concatenated K/V are freed at once, and only q, k, v (views of the
    block's qkv output), the output and the log-sum-exp are saved, so memory does not grow with P.

    Backward: the flash backward over the T image keys alone, fed the full output and
    log-sum-exp, gives the image keys' share of dq and all of dk, dv exactly (softmax gradients
    only need each key's probability, recomputed from the log-sum-exp, and the row sums
    ``sum(do * o)``). The prompt keys' share is recomputed with plain matmuls: their keys are
    shared, so the batch folds into the query rows and each head's scores are one
    (B * T, P) matmul, with no expand and no (B, H, P, hd) gradients to sum over the batch.
    Nothing of size (B, H, T, P) is stored; the scores live per group of heads. When the image
    queries need no gradient (the first block), the image backward is skipped.

    A split forward as well (flash over the T image keys, the prompt part by matmuls, the two
    merged by their log-sum-exps) was measured and was no faster than the fused forward, which
    gives the merged log-sum-exp for free; so only the backward is split.
    """

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pk: torch.Tensor,
        pv: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        B = q.shape[0]
        k_all = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)  # (B, H, P + T, hd)
        v_all = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)  # (B, H, P + T, hd)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        o, lse = flash(q, k_all, v_all, scale=scale)  # (B, H, T, hd), (B, H, T)
        ctx.save_for_backward(q, k, v, pk, pv, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do: torch.Tensor):  # do: (B, H, T, hd)
        q, k, v, pk, pv, o, lse = ctx.saved_tensors
        need_q, need_k, need_v, need_pk, need_pv, _ = ctx.needs_input_grad
        scale = ctx.scale
        B, H, T, _ = q.shape
        P = pk.shape[2]
        dq = dk = dv = dpk = dpv = None
        if need_q or need_k or need_v:  # image keys' share, with the full output and lse
            flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
            dq, dk, dv = flash_backward(do, q, k, v, o, lse, 0.0, False, scale=scale)
        # prompt keys' share, batch folded into rows: (H, B * T, ...)
        qf, dof = _fold_batch(q), _fold_batch(do)  # (H, B * T, hd)
        neg_row = _fold_batch(torch.linalg.vecdot(do, o).unsqueeze(-1)).neg_()  # (H, B * T, 1)
        neg_lse2 = _fold_batch(lse.unsqueeze(-1)).mul_(-_LOG2E)  # (H, B * T, 1), base 2
        pk2 = pk[0] * (scale * _LOG2E)  # (H, P, hd): base-2 logits come out of the matmul
        dpk_ = torch.empty_like(pk[0]) if need_pk else None  # (H, P, hd)
        dpv_ = torch.empty_like(pv[0]) if need_pv else None  # (H, P, hd)
        dq_p = torch.empty_like(qf) if need_q else None  # (H, B * T, hd)
        for g in _head_groups(H, B * T, P):
            # probabilities exp(s - lse): (h, B * T, P)
            p = torch.baddbmm(neg_lse2[g], qf[g], pk2[g].transpose(1, 2)).exp2_()
            if need_pv:
                torch.bmm(p.transpose(1, 2), dof[g], out=dpv_[g])  # (h, P, hd)
            # score gradients p * (do . pv - sum(do * o)): (h, B * T, P)
            ds = torch.baddbmm(neg_row[g], dof[g], pv[0, g].transpose(1, 2)).mul_(p)
            del p
            if need_pk:
                torch.bmm(ds.transpose(1, 2), qf[g], out=dpk_[g])  # (h, P, hd)
            if need_q:
                torch.bmm(ds, pk[0, g], out=dq_p[g])  # (h, B * T, hd)
        if need_q:
            dq.add_(_unfold_batch(dq_p, B), alpha=scale)  # (B, H, T, hd)
        if need_pk:
            dpk = dpk_.mul_(scale).unsqueeze(0)  # (1, H, P, hd)
        if need_pv:
            dpv = dpv_.unsqueeze(0)  # (1, H, P, hd)
        return dq, dk, dv, dpk, dpv, None


def block_with_prompt_kv(
    block: Block,
    x: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    rows: int | None = None,
) -> torch.Tensor:
    """One timm `Block` on image tokens that also attend to prompt keys/values.

    Args:
        x: image tokens (B, T, D) (prefix + patches, no prompts).
        pk: prompt keys (1 or B, H, P, hd); pv: prompt values, same shape.
        attn_mask: optional boolean mask (B, 1, 1, P + T), True where a row may attend (used to
            serve tasks with different prompt lengths, zero-padded, in one batch).
        rows: compute the output of the first ``rows`` tokens only (all T tokens still serve as
            keys and values). The last block of a model pooled by its class token needs one.

    Returns:
        The block's output for the image tokens, (B, T, D) (or (B, rows, D)): exactly what the
        full block computes at those positions when the prompt tokens are part of its input.

    The attention is fused SDPA over ``[prompt K/V, image K/V]``, or, when `use_split_backward`
    says so (training on the CPU with prompts shared by the batch), `PromptKVAttention`: the
    same forward with a backward split into image and prompt keys. Both are exact; the choice is
    made per call, so serving (masked, no grad), attention dropout and per-sample prompts keep
    fused SDPA.
    """
    attn = block.attn
    B, T, _ = x.shape
    h = block.norm1(x)
    qkv = attn.qkv(h).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each (B, H, T, hd)
    if rows is not None and rows < T:
        x, h, q, T = x[:, :rows], h[:, :rows], q[:, :, :rows], rows  # queries of the kept rows
        if attn_mask is not None:
            attn_mask = attn_mask[:, :, :rows] if attn_mask.shape[2] > 1 else attn_mask
    gate = attn.gate(h).sigmoid() if attn.gate is not None else None
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout = attn.attn_drop.p if attn.training else 0.0
    if use_split_backward(q, pk, pv, attn_mask, dropout):
        o = PromptKVAttention.apply(q, k, v, pk, pv, attn.scale)  # (B, H, T, hd)
    else:
        k = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)  # (B, H, P + T, hd)
        v = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)  # (B, H, P + T, hd)
        if q.requires_grad and q._base is not None:
            # SDPA saves q for backward; as a view it would keep the whole (3, B, H, T, hd) qkv
            # buffer alive although k and v are copies now. A copy of q frees the buffer: about
            # 12% less saved activation memory on ViT-B/16 at 50 prompts.
            q = q.clone(memory_format=torch.contiguous_format)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout
        )  # (B, H, T, hd)
    o = attn.norm(o.transpose(1, 2).reshape(B, T, attn.attn_dim))  # (B, T, H * hd)
    if gate is not None:
        o = o * gate
    o = attn.proj_drop(attn.proj(o))
    x = x + block.drop_path1(block.ls1(o))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class VPT(Method):
    """Learnable prompt tokens in the input space of a frozen ViT (shallow or deep)."""

    config_class: ClassVar[type[MethodConfig]] = VPTConfig

    def __init__(self, config: VPTConfig, backbone: nn.Module) -> None:
        super().__init__(config, backbone)
        vit = check_vit(backbone, config.name)
        dim = vit.embed_dim
        depth = len(vit.blocks)
        self.num_backbone_prefix = vit.num_prefix_tokens
        self.prompt_len = config.prompt_len
        prompt_dim = config.project if config.project > 0 else dim
        layers = depth if config.deep else 1
        self.prompts = nn.Parameter(torch.zeros(layers, config.prompt_len, prompt_dim))  # (L, P, d)
        if config.project > 0:
            self.prompt_proj: nn.Module = nn.Linear(prompt_dim, dim)
            nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
        else:
            self.prompt_proj = nn.Identity()
        self.prompt_dropout = nn.Dropout(config.prompt_dropout)
        self.reset_prompts(vit)
        self.fast_path = self._choose_path(vit)

    def _choose_path(self, vit: VisionTransformer) -> bool:
        cfg: VPTConfig = self.config
        if not cfg.deep or cfg.fast == "off" or cfg.pool == "all-mean":
            return False
        unsupported = sorted({type(b).__name__ for b in vit.blocks if not supports_fast_path(b)})
        if unsupported:
            if cfg.fast == "on":
                raise ConfigError(
                    f"{cfg.name}: fast=on needs timm's standard Block/Attention; this backbone has "
                    f"{unsupported}. Use fast='auto' to fall back to the reference path"
                )
            return False
        return True

    def reset_prompts(self, vit: VisionTransformer) -> None:
        """Initialise the prompts as ``config.init`` says."""
        cfg: VPTConfig = self.config
        if cfg.init == "uniform":
            patch = vit.patch_embed.patch_size
            val = math.sqrt(6.0 / float(3 * patch[0] * patch[1] + self.prompts.shape[-1]))
            nn.init.uniform_(self.prompts, -val, val)
        elif cfg.init == "normal":
            nn.init.normal_(self.prompts, std=0.02)
        else:
            nn.init.zeros_(self.prompts)

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens in the output of `forward_features` (none on the fast path)."""
        return 0 if self.fast_path else self.prompt_len

    def layer_prompts(self, layer: int, batch: int) -> torch.Tensor:
        """Prompt tokens for a block, projected and dropped out: (P, D) or (B, P, D).

        Without dropout in training the prompts are shared by the batch and returned as (P, D);
        with it, each sample gets its own dropout mask, as in the official code.
        """
        p = self.prompt_proj(self.prompts[layer])  # (P, D)
        if self.prompt_dropout.p > 0 and self.training:
            p = self.prompt_dropout(p.expand(batch, -1, -1))  # (B, P, D)
        return p

    def forward_features(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = embed_tokens(backbone, x)  # (B, prefix + N, D)
        if self.fast_path:
            x = self._blocks_fast(backbone, x)
        else:
            x = self._blocks_reference(backbone, x)
        return backbone.norm(x)

    def forward_first_token(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """On the fast path the last block computes the class token's row alone: its queries,
        attention output, projection and MLP for one token instead of prefix + N (the other
        tokens still give keys and values). About 1/depth less compute and saved activations
        for models pooled by their class token; exact like the rest of the fast path."""
        if not self.fast_path:
            return super().forward_first_token(backbone, x)
        x = embed_tokens(backbone, x)  # (B, prefix + N, D)
        return backbone.norm(self._blocks_fast(backbone, x, last_rows=1))  # (B, 1, D)

    def _run(self, fn, *args: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _blocks_fast(
        self, backbone: VisionTransformer, x: torch.Tensor, last_rows: int | None = None
    ) -> torch.Tensor:
        B = x.shape[0]
        depth = len(backbone.blocks)
        for i, block in enumerate(backbone.blocks):
            pk, pv = prompt_kv(block, self.layer_prompts(i, B))  # (1|B, H, P, hd)
            rows = last_rows if i == depth - 1 else None

            def run(t, k, v, blk=block, rows=rows):
                return block_with_prompt_kv(blk, t, k, v, rows=rows)

            x = self._run(run, x, pk, pv)
        return x  # (B, prefix + N, D), or (B, last_rows, D)

    def _blocks_reference(self, backbone: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        s = self.num_backbone_prefix
        P = self.prompt_len
        for i, block in enumerate(backbone.blocks):
            if i == 0 or self.config.deep:
                p = self.layer_prompts(i, B).expand(B, -1, -1)  # (B, P, D)
                rest = x[:, s:] if i == 0 else x[:, s + P :]  # patches (B, N, D)
                x = torch.cat([x[:, :s], p, rest], dim=1)  # (B, prefix + P + N, D)
            x = self._run(block, x)
        return x  # (B, prefix + P + N, D)


@register_method
class VPTShallow(VPT):
    config_class: ClassVar[type[MethodConfig]] = VPTShallowConfig


@register_method
class VPTDeep(VPT):
    config_class: ClassVar[type[MethodConfig]] = VPTDeepConfig
