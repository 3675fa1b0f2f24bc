"""Read checkpoints safely and load them strictly through an explicit key filter.

The filter does exactly two things, both visible in code: it drops classifier-head keys the
headless backbone does not have, and it resamples a ViT ``pos_embed`` to the model's patch grid.
Everything else must match key for key and shape for shape, or a `BackboneError` lists the
differences.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vprompt.errors import BackboneError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
# Containers that training scripts wrap a state dict in, tried in this order.
_CONTAINER_KEYS = ("state_dict", "model")
# Prefixes that wrappers put in front of every key of the network they hold.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
_MAX_LISTED = 12

StateDict = dict[str, torch.Tensor]


def read_checkpoint(path: Path) -> StateDict:
    """Read a state dict from a ``.safetensors`` or torch (``.pth``/``.pt``/``.bin``) file.

    Torch files are read with ``weights_only=True``: tensors and plain containers only, never
    arbitrary pickled objects.
    """
    if not path.is_file():
        raise BackboneError(
            f"Checkpoint file not found: {path}. Check the path after 'file:' "
            "(relative paths are resolved against the current directory)."
        )
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return strip_wrapper_prefixes(_read_safetensors(path))
    if suffix in TORCH_SUFFIXES:
        return unwrap_state_dict(_read_torch(path), path)
    raise BackboneError(
        f"Unsupported checkpoint type {suffix or '(no suffix)'!r} for {path}; expected one of "
        f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}."
    )


def _read_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError) as e:
        raise BackboneError(f"Cannot read safetensors checkpoint {path}: {e}") from e


def blocked_global(error: BaseException) -> str | None:
    """The Python object a ``torch.load(weights_only=True)`` refused to unpickle, from torch's
    message ("Unsupported global: GLOBAL numpy...", "unsupported GLOBAL posix.system whose
    module posix is blocked"), else None. Its text also suggests ``weights_only=False``, the
    unsafe way out, so vprompt shows only this cause."""
    found = re.search(r"unsupported (?:global: )?global ([\w.]+)", str(error), flags=re.I)
    return found.group(1) if found else None


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = blocked_global(e)
        if found is None:
            raise BackboneError(
                f"Cannot read torch checkpoint {path}: it is not a file torch.save wrote (or it "
                "is damaged); check the path, download it again, or use a .safetensors file"
            ) from None
        raise BackboneError(
            f"{path} holds Python objects other than tensors ({found}), and vprompt "
            "never unpickles code. Re-save only the weights, e.g. "
            "torch.save(model.state_dict(), path), or convert it to .safetensors"
        ) from None
    except (RuntimeError, OSError, EOFError) as e:
        raise BackboneError(f"Cannot read torch checkpoint {path}: {e}") from e


def unwrap_state_dict(obj: Any, source: Path | str) -> StateDict:
    """Find the state dict inside common containers (``{"state_dict": ...}``, ``{"model": ...}``),
    without the wrapper prefixes of `strip_wrapper_prefixes`."""
    for _ in range(3):
        if _is_state_dict(obj):
            break
        if not isinstance(obj, Mapping):
            raise BackboneError(
                f"{source} does not hold a state dict (found {type(obj).__name__})."
            )
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise BackboneError(
                f"{source} is a dict but not a state dict, and has none of the container keys "
                f"{list(_CONTAINER_KEYS)}; its top-level keys are {sorted(map(str, obj))[:10]}."
            )
        obj = inner
    if not _is_state_dict(obj):
        raise BackboneError(f"No state dict of tensors found in {source}.")
    return strip_wrapper_prefixes(dict(obj))


def strip_wrapper_prefixes(state: StateDict) -> StateDict:
    """Remove a prefix that every key shares because the model was saved inside a wrapper:
    ``module.`` (DistributedDataParallel / DataParallel), ``_orig_mod.`` (``torch.compile``) and
    ``model.`` (a Lightning module holding the network as ``self.model``), in any nesting."""
    while state:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def head_prefixes(model_or_cfg: nn.Module | Mapping[str, Any]) -> tuple[str, ...]:
    """Module names of the classifier head(s), from timm's pretrained cfg (``head``, ``fc``...)."""
    if isinstance(model_or_cfg, nn.Module):
        cfg = getattr(model_or_cfg, "pretrained_cfg", None) or {}
    else:
        cfg = model_or_cfg
    classifier = cfg.get("classifier")
    if not classifier:
        return ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def head_num_classes(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> int | None:
    """Number of classes of the checkpoint's classifier (rows of ``<head>.weight``), if any."""
    for prefix in prefixes:
        w = state.get(f"{prefix}.weight")
        if w is not None and w.ndim >= 2:
            return int(w.shape[0])
    return None


def drop_head_keys(state: StateDict, model: nn.Module) -> StateDict:
    """Drop checkpoint keys under the classifier head that the (headless) model does not have."""
    prefixes = head_prefixes(model)
    own = model.state_dict()
    return {k: v for k, v in state.items() if k in own or not _under(k, prefixes)}


def resize_pos_embed(
    state: StateDict,
    model: nn.Module,
    *,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> StateDict:
    """Resample the checkpoint's ``pos_embed`` to the model's patch grid (ViT family).

    Only a square checkpoint grid with the same width and prefix-token count is resampled; any
    other difference is left for the strict load to report.
    """
    from timm.layers import resample_abs_pos_embed

    src = state.get("pos_embed")
    own = model.state_dict().get("pos_embed")
    patch_embed = getattr(model, "patch_embed", None)
    if src is None or own is None or src.shape == own.shape or patch_embed is None:
        return state
    num_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    old_tokens = src.shape[1] - num_prefix
    side = math.isqrt(old_tokens)
    if src.ndim != 3 or src.shape[-1] != own.shape[-1] or side * side != old_tokens:
        return state
    resized = resample_abs_pos_embed(
        src,  # (1, prefix + side * side, D)
        new_size=list(patch_embed.grid_size),
        old_size=[side, side],
        num_prefix_tokens=num_prefix,
        interpolation=interpolation,
        antialias=antialias,
    )  # (1, prefix + gh * gw, D)
    return {**state, "pos_embed": resized}


def fit_report(
    own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str
) -> str | None:
    """Describe how ``state`` differs from ``own`` (keys and shapes), or None when it fits.

    Args:
        own: the target's state dict (tensors may be on the meta device).
        state: the filtered checkpoint.
        what: names the source and target, e.g. "ckpt.pth for timm 'resnet18'".
    """
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return None
    lines = [f"Checkpoint {what} does not fit:"]
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("mismatched shapes", mismatched),
    ):
        if items:
            lines.append(f"  {label} ({len(items)}): {_short_list(items)}")
    return "\n".join(lines)


def load_strict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    what: str,
    hint: str,
    *,
    assign: bool = False,
) -> None:
    """``model.load_state_dict(state, strict=True)`` with an error naming every difference.

    Args:
        model: the target model.
        state: the filtered checkpoint.
        what: names the source and target in the error.
        hint: what to do about a mismatch (appended to the error).
        assign: adopt the checkpoint tensors (cast to the model's dtypes) instead of copying
            into the model's own; used for models built on the meta device.
    """
    own = model.state_dict()
    report = fit_report(own, state, what)
    if report is not None:
        raise BackboneError(f"{report}\n{hint}")
    if assign:
        state = {k: v.to(own[k].dtype) for k, v in state.items()}
    model.load_state_dict(dict(state), strict=True, assign=assign)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # only possible for tensors outside the state dict
        raise BackboneError(f"Internal error: {what} left tensors unset: {_short_list(leftover)}")


def _short_list(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")
