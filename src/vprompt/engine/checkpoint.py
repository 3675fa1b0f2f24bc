"""The resumable training checkpoint: tensors and plain containers only, written atomically.

``checkpoint.pt`` loads with ``torch.load(weights_only=True)``: it holds the trainable state of the
model, the optimizer and schedule states, every RNG state and the loop position, and nothing
pickled. ``checkpoint.json`` beside it says in plain text where the checkpoint stands.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vprompt._atomic import atomic_write, atomic_write_text
from vprompt.errors import TrainingError

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_INFO = "checkpoint.json"
FORMAT = 1


def rng_state() -> dict[str, Any]:
    """torch, CUDA, numpy and python RNG states as tensors and lists."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": int(version), "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write ``checkpoint.pt`` (then ``checkpoint.json``) through temporary files + rename."""
    path = run_dir / CHECKPOINT
    atomic_write(path, lambda p: torch.save({"format": FORMAT, **state}, p))
    info = {
        k: state[k] for k in ("epoch", "step_in_epoch", "global_step", "complete") if k in state
    }
    atomic_write_text(run_dir / CHECKPOINT_INFO, json.dumps(info))
    return path


def load_checkpoint(run_dir: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read ``checkpoint.pt`` with ``weights_only=True``.

    Raises:
        TrainingError: it is missing or unreadable.
    """
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise TrainingError(
            f"{path} does not exist: the run stopped before its first checkpoint; start it again "
            "with --overwrite"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        from vprompt.backbones.checkpoint import blocked_global

        found = blocked_global(e)
        cause = (  # torch's own text suggests weights_only=False, the unsafe way out
            f"it holds a Python object ({found}) that vprompt never unpickles"
            if found
            else f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        )
        raise TrainingError(
            f"{path} is not a checkpoint vprompt wrote, or it is damaged ({cause}); start the "
            "run again with --overwrite"
        ) from None
    if not isinstance(state, dict):
        raise TrainingError(
            f"{path} is not a vprompt checkpoint (it holds a {type(state).__name__}); restart "
            "with --overwrite"
        )
    if state.get("format") != FORMAT:
        raise TrainingError(
            f"{path} has checkpoint format {state.get('format')}, expected {FORMAT}"
        )
    model = state.get("model")
    if isinstance(model, dict) and not all_finite(model):
        raise TrainingError(
            f"{path} holds NaN/inf weights: it was damaged or written by a diverged run (vprompt "
            "never checkpoints those); start the run again with --overwrite"
        )
    return state


def nonfinite_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating tensors that hold a NaN or an infinity, sorted."""
    return sorted(
        k
        for k, t in tensors.items()
        if torch.is_floating_point(t) and not bool(torch.isfinite(t).all())
    )


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    """True if no floating tensor holds a NaN or an infinity."""
    return not nonfinite_keys(tensors)
