"""What tasks can share in one forward pass, and the shared passes themselves.

Every task is put in one of four kinds of group (see ``docs/serving.md``):

* ``plain``: methods that add nothing to the backbone's forward (linear probe). One plain
  ``forward_features`` pass serves the rows of every such task.
* ``prompt-kv``: VPT/SPT-deep on the fast path. Each task's per-block prompt keys/values are
  computed once when the task is loaded (`PromptKV`); a pass gathers them per row. Tasks with
  different prompt lengths share the pass: keys/values are zero-padded to the longest and the
  padding is masked out of attention, so the result is exact.
* ``prompt-tokens``: VPT/SPT on the reference path (shallow, or deep where the fast path does not
  apply). Prompt tokens are part of the sequence, so rows are grouped by prompt length; shallow
  and deep tasks of one length share a pass.
* ``own``: methods that change backbone weights (full, bitfit, partial), add input-dependent
  blocks (pro-tuning) or change the input (vpt-pad), and any other method, run their own model
  on their own rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vprompt.methods.base import Method, PromptedModel
from vprompt.methods.vpt import VPT, block_with_prompt_kv, embed_tokens, prompt_kv

GroupKind = Literal["plain", "prompt-kv", "prompt-tokens", "own"]

__all__ = [
    "GroupKey",
    "GroupKind",
    "PromptKV",
    "PromptTokens",
    "build_cache",
    "forward_prompt_kv",
    "forward_prompt_tokens",
    "group_kind",
]


@dataclass(frozen=True)
class GroupKey:
    """Rows whose tasks have equal keys run in one forward pass.

    Attributes:
        kind: see the module docstring.
        prompt_len: ``prompt-tokens`` only: the sequence length depends on it.
        task: ``own`` only: the task whose model runs.
    """

    kind: GroupKind
    prompt_len: int = 0
    task: str = ""

    def describe(self) -> str:
        if self.kind == "prompt-tokens":
            return f"prompt-tokens(P={self.prompt_len})"
        return f"own({self.task})" if self.kind == "own" else self.kind


@dataclass(frozen=True, eq=False)
class PromptKV:
    """Per-block prompt keys and values of a fast-path deep prompt task.

    Attributes:
        keys: one (1, H, P, head_dim) tensor per block.
        values: same shapes as ``keys``.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def prompt_len(self) -> int:
        return int(self.keys[0].shape[2])


@dataclass(frozen=True, eq=False)
class PromptTokens:
    """Projected prompt tokens of a reference-path prompt task.

    Attributes:
        tokens: (L, P, D): L = depth for deep prompts, 1 for shallow.
        deep: replace the prompt outputs by the next block's prompts before every block >= 1.
    """

    tokens: torch.Tensor
    deep: bool

    @property
    def prompt_len(self) -> int:
        return int(self.tokens.shape[1])


# ---------------------------------------------------------------------------------- planning
def _is_plain(method: Method) -> bool:
    """True if the method's features are exactly the backbone's own ``forward_features``."""
    return (
        type(method).forward_features is Method.forward_features
        and not method.trains_backbone
        and next(method.parameters(), None) is None
        and next(method.buffers(), None) is None
    )


def group_kind(model: PromptedModel, shared: nn.Module) -> GroupKind:
    """Which kind of group a task's rows can join (``shared``: the shared backbone model)."""
    method = model.method
    if model.backbone is not shared:
        return "own"  # a tuned copy of the backbone (full, bitfit, partial)
    if isinstance(method, VPT) and type(method).forward_features is VPT.forward_features:
        return "prompt-kv" if method.fast_path else "prompt-tokens"
    return "plain" if _is_plain(method) else "own"


@torch.no_grad()
def build_cache(model: PromptedModel, kind: GroupKind) -> PromptKV | PromptTokens | None:
    """What a task's rows need in a shared pass, computed once (prompts do not depend on input).

    The model must be in eval mode (no prompt dropout).
    """
    method = model.method
    if kind == "prompt-kv":
        assert isinstance(method, VPT)
        kv = [prompt_kv(b, method.layer_prompts(i, 1)) for i, b in enumerate(model.backbone.blocks)]
        return PromptKV(
            keys=tuple(k.contiguous() for k, _ in kv),  # each (1, H, P, hd)
            values=tuple(v.contiguous() for _, v in kv),  # each (1, H, P, hd)
        )
    if kind == "prompt-tokens":
        assert isinstance(method, VPT)
        layers = range(method.prompts.shape[0])
        tokens = torch.stack([method.layer_prompts(i, 1) for i in layers])  # (L, P, D)
        return PromptTokens(tokens=tokens.contiguous(), deep=bool(method.config.deep))
    return None


# ---------------------------------------------------------------------------------- prompt-kv
def _pad_prompts(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad (1, H, P, hd) prompt keys/values to (1, H, length, hd)."""
    return F.pad(t, (0, 0, 0, length - t.shape[2]))


def gather_kv(
    caches: Sequence[PromptKV], layer: int, counts: Sequence[int], length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt keys/values of one block for rows sorted by task.

    Returns:
        Keys and values, (1, H, P, hd) for a single task, else (n, H, length, hd) with task t's
        ``counts[t]`` rows in order.
    """
    if len(caches) == 1:
        return caches[0].keys[layer], caches[0].values[layer]  # (1, H, P, hd)
    keys = [
        _pad_prompts(c.keys[layer], length).expand(n, -1, -1, -1)  # (n_t, H, length, hd)
        for c, n in zip(caches, counts, strict=True)
    ]
    values = [
        _pad_prompts(c.values[layer], length).expand(n, -1, -1, -1)  # (n_t, H, length, hd)
        for c, n in zip(caches, counts, strict=True)
    ]
    return torch.cat(keys), torch.cat(values)  # each (n, H, length, hd)


def prompt_mask(
    lengths: Sequence[int], counts: Sequence[int], tokens: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean attention mask hiding padded prompt keys, or None when no row is padded.

    Returns:
        (n, 1, 1, max(lengths) + tokens): True where a row may attend.
    """
    longest = max(lengths)
    if all(p == longest for p in lengths):
        return None
    per_row = torch.repeat_interleave(
        torch.tensor(lengths, device=device), torch.tensor(counts, device=device)
    )  # (n,)
    prompts = torch.arange(longest, device=device) < per_row[:, None]  # (n, longest)
    image = torch.ones(per_row.shape[0], tokens, dtype=torch.bool, device=device)  # (n, T)
    return torch.cat([prompts, image], dim=1)[:, None, None, :]  # (n, 1, 1, longest + T)


def forward_prompt_kv(
    vit: VisionTransformer,
    x: torch.Tensor,
    caches: Sequence[PromptKV],
    counts: Sequence[int],
    first_token_only: bool = False,
) -> torch.Tensor:
    """Fast-path deep prompts of several tasks in one pass.

    Args:
        vit: the shared frozen backbone.
        x: images (n, 3, H, W), sorted by task.
        caches: one per task, in row order; counts: rows per task.
        first_token_only: every task reads only the class token (pool ``cls``): the last block
            then computes that row alone.

    Returns:
        Features (n, prefix + N, D), as each task's own `forward_features` gives them, or their
        first token (n, 1, D).
    """
    t = embed_tokens(vit, x)  # (n, prefix + N, D)
    lengths = [c.prompt_len for c in caches]
    mask = prompt_mask(lengths, counts, t.shape[1], t.device)  # (n, 1, 1, P + T) or None
    last = len(vit.blocks) - 1
    for i, block in enumerate(vit.blocks):
        pk, pv = gather_kv(caches, i, counts, max(lengths))  # (1|n, H, P, hd)
        rows = 1 if first_token_only and i == last else None
        t = block_with_prompt_kv(block, t, pk, pv, attn_mask=mask, rows=rows)
    return vit.norm(t)  # (n, prefix + N, D) or (n, 1, D)


# ---------------------------------------------------------------------------------- prompt-tokens
def gather_layer_prompts(
    caches: Sequence[PromptTokens], layer: int, counts: Sequence[int], current: torch.Tensor
) -> torch.Tensor:
    """Prompt tokens entering block ``layer`` for rows sorted by task.

    Deep tasks bring their own layer's prompts; shallow tasks keep ``current`` (the previous
    block's outputs at the prompt positions, (n, P, D)).

    Returns:
        (n, P, D).
    """
    parts, start = [], 0
    for c, n in zip(caches, counts, strict=True):
        if layer == 0 or c.deep:
            parts.append(c.tokens[layer].expand(n, -1, -1))  # (n_t, P, D)
        else:
            parts.append(current[start : start + n])  # (n_t, P, D)
        start += n
    return torch.cat(parts)  # (n, P, D)


def forward_prompt_tokens(
    vit: VisionTransformer, x: torch.Tensor, caches: Sequence[PromptTokens], counts: Sequence[int]
) -> torch.Tensor:
    """Reference-path prompts of several tasks with one prompt length P, in one pass.

    Args:
        vit: the shared frozen backbone.
        x: images (n, 3, H, W), sorted by task.
        caches: one per task, in row order, all of one prompt length; counts: rows per task.

    Returns:
        Features (n, prefix + P + N, D), as each task's own `forward_features` gives them.
    """
    s = vit.num_prefix_tokens
    P = caches[0].prompt_len
    t = embed_tokens(vit, x)  # (n, s + N, D)
    p = gather_layer_prompts(caches, 0, counts, t)  # (n, P, D)
    t = torch.cat([t[:, :s], p, t[:, s:]], dim=1)  # (n, s + P + N, D)
    any_deep = any(c.deep for c in caches)
    for i, block in enumerate(vit.blocks):
        if i > 0 and any_deep:
            p = gather_layer_prompts(caches, i, counts, t[:, s : s + P])  # (n, P, D)
            t = torch.cat([t[:, :s], p, t[:, s + P :]], dim=1)  # (n, s + P + N, D)
        t = block(t)
    return vit.norm(t)  # (n, s + P + N, D)
