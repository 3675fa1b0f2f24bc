"""DINOv2 ViT-S/14 weights read out of an ONNX export -> timm ``vit_small_patch14_dinov2``.

The ONNX file (a Hugging Face ``Dinov2Model`` backbone plus a saliency decoder) is read with
the ``onnx`` package only, by walking the graph:

* Named initializers (``backbone.encoder.layer.N.norm1.weight``...) are used as they are.
* Linear layers are exported as ``MatMul(x, W)`` followed by ``Add(bias, .)``: ``W`` is an
  anonymous initializer holding the transposed weight (``in x out``), and the module's name is
  read off the bias initializer of the Add that consumes the MatMul's output.
* ``query``, ``key`` and ``value`` are separate linears; timm's ``attn.qkv`` is their
  concatenation along the output dimension, in that order.
* Layer-scale gammas are ``layer_scale{1,2}.lambda1`` (timm ``ls{1,2}.gamma``).
* The position table is split into an anonymous ``(1, 1, D)`` CLS part, concatenated in front
  of the patch part, and an anonymous ``(1, 37 * 37, D)`` patch part that the graph resizes to
  the input's grid. Both are found by walking from the embeddings' ``Add`` node.
* ``decoder.*`` (the saliency head) is dropped.

The result is the full-resolution (518 px, 37 x 37 grid) timm state dict; it is resampled to the
requested image size at load time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vprompt.backbones.checkpoint import StateDict, fit_report
from vprompt.errors import BackboneError

if TYPE_CHECKING:
    import onnx

ARCH = "vit_small_patch14_dinov2"
FULL_IMG_SIZE = 518  # 37 x 37 patches of 14 px
_IGNORED_PREFIXES = ("decoder.",)
# Ops between the stored patch position table and the Concat that joins it to the CLS part.
_POS_TABLE_PATH_OPS = {"Reshape", "Transpose", "Cast", "Resize"}

_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"^backbone\.embeddings\.cls_token$", "cls_token"),
        (r"^backbone\.embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"patch_embed.proj.\1"),
        (r"^backbone\.encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)$", r"blocks.\1.norm\2.\3"),
        (r"^backbone\.encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
        (r"^backbone\.encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
        (r"^backbone\.encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", r"blocks.\1.mlp.\2.\3"),
        (r"^backbone\.layernorm\.(weight|bias)$", r"norm.\1"),
    ]
]  # fmt: skip
_QKV = re.compile(r"^backbone\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")  # fmt: skip


class _Graph:
    """Index of an ONNX graph: initializers, and the node producing / consuming each value."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        from onnx import numpy_helper

        self._to_array = numpy_helper.to_array
        self.nodes = list(graph.node)
        self.inits = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(node)

    def tensor(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self._to_array(self.inits[name]).copy())


def read_linear_weights(g: _Graph) -> dict[str, torch.Tensor]:
    """Name each ``MatMul`` weight after the bias of the ``Add`` that follows it.

    Returns:
        ``{module + ".weight": W.T}`` in torch ``(out, in)`` layout.
    """
    weights: dict[str, torch.Tensor] = {}
    for node in (n for n in g.nodes if n.op_type == "MatMul"):
        w_name = next((i for i in node.input if i in g.inits), None)
        if w_name is None:
            continue  # attention scores / context: no stored weight
        adds = [n for n in g.consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for a in adds for i in a.input if i in g.inits and i.endswith(".bias")]
        if len(biases) != 1:
            raise BackboneError(
                f"ONNX MatMul {node.name!r} (weight {w_name}) is not followed by one Add with a "
                f"named bias (found {biases}); cannot tell which layer it belongs to."
            )
        weights[biases[0].removesuffix(".bias") + ".weight"] = g.tensor(w_name).T.contiguous()
    return weights


def find_position_table(g: _Graph) -> tuple[torch.Tensor, torch.Tensor]:
    """Find the CLS part ``(1, 1, D)`` and patch part ``(1, N, D)`` of the position table.

    Walks from the CLS token forward to the embeddings' ``Add``; its other operand is a
    ``Concat(cls_pos, resized(patch_pos))``.
    """
    cls_name = next((n for n in g.inits if n.endswith("embeddings.cls_token")), None)
    if cls_name is None:
        raise BackboneError("No 'embeddings.cls_token' initializer in the ONNX graph.")
    add, tokens_value = _first_downstream(g, cls_name, "Add")
    pos_value = next(i for i in add.input if i != tokens_value)
    concat = g.producer.get(pos_value)
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
        raise BackboneError(f"Unexpected position-embedding subgraph at ONNX node {add.name!r}.")
    cls_pos_name, patch_value = concat.input
    if cls_pos_name not in g.inits:
        raise BackboneError(f"The CLS position embedding feeding {concat.name!r} is not stored.")
    patch_pos_name = _trace_back_to_initializer(g, patch_value)
    return g.tensor(cls_pos_name), g.tensor(patch_pos_name)


def _first_downstream(g: _Graph, start: str, op_type: str) -> tuple[Any, str]:
    """Breadth-first search for the first ``op_type`` node fed (indirectly) by ``start``.

    Returns:
        The node and the value through which it was reached.
    """
    frontier, seen = [start], set()
    while frontier:
        value = frontier.pop(0)
        for node in g.consumers.get(value, []):
            if node.op_type == op_type:
                return node, value
            if id(node) not in seen:  # node names may be empty, so identity
                seen.add(id(node))
                frontier.extend(node.output)
    raise BackboneError(f"No {op_type} node downstream of {start!r} in the ONNX graph.")


def _trace_back_to_initializer(g: _Graph, value: str) -> str:
    while value not in g.inits:
        node = g.producer.get(value)
        if node is None or node.op_type not in _POS_TABLE_PATH_OPS:
            raise BackboneError(f"Cannot trace the patch position table back from {value!r}.")
        value = node.input[0]  # the data operand
    return value


def to_timm(
    named: dict[str, torch.Tensor], cls_pos: torch.Tensor, patch_pos: torch.Tensor
) -> StateDict:
    """Rename HF ``Dinov2Model`` tensors to timm names, fuse q/k/v, join the position table."""
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for name, t in named.items():
        if name.startswith(_IGNORED_PREFIXES):
            continue
        if m := _QKV.match(name):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = t
            continue
        for pattern, repl in _RENAMES:
            if pattern.match(name):
                out[pattern.sub(repl, name)] = t
                break
        else:
            unknown.append(name)
    if unknown:
        raise BackboneError(f"ONNX tensors with no timm counterpart: {sorted(unknown)[:10]}")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            raise BackboneError(f"Layer {layer} {kind}: q/k/v incomplete (found {sorted(parts)}).")
        # (3 * D, D) weight / (3 * D,) bias, rows ordered q, k, v
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0
        )
    out["pos_embed"] = torch.cat([cls_pos, patch_pos], dim=1)  # (1, 1 + 37 * 37, D)
    return out


def convert_dinov2_onnx(
    src: Path, progress: Callable[[str, int, int], None] | None = None
) -> StateDict:
    """Convert the DINOv2 backbone inside an ONNX file to a strict-loading timm state dict."""
    try:
        import onnx
    except ImportError as e:
        raise BackboneError(
            "zoo:dinov2-s is converted from an ONNX file and needs the onnx package: "
            "pip install onnx (or pip install 'vprompt[zoo]')"
        ) from e
    import timm

    def step(desc: str, done: int) -> None:
        if progress is not None:
            progress(desc, done, 4)

    step("reading ONNX graph", 0)
    graph = _Graph(onnx.load(str(src)).graph)
    step("pairing MatMul weights with biases", 1)
    named = {n: graph.tensor(n) for n in graph.inits if n.startswith("backbone.")}
    named.update(read_linear_weights(graph))
    step("locating the position table", 2)
    cls_pos, patch_pos = find_position_table(graph)
    side = math.isqrt(patch_pos.shape[1])
    if side * side != patch_pos.shape[1]:
        raise BackboneError(f"Patch position table of {patch_pos.shape[1]} tokens is not square.")
    state = to_timm(named, cls_pos, patch_pos)
    step("checking against timm", 3)
    with torch.device("meta"):
        template = timm.create_model(ARCH, img_size=side * 14, num_classes=0).state_dict()
    report = fit_report(template, state, f"{src} (converted) for timm {ARCH!r}")
    if report is not None:
        raise BackboneError(report)
    step("done", 4)
    return {k: state[k].float().contiguous() for k in template}
