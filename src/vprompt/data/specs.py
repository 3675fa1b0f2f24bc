"""Parse dataset spec strings such as ``folder:/data/pets?val=0.1&test=0.2``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import parse_qsl

from vprompt.errors import DataError, DataSpecError

SpecKind = Literal["folder", "vtab", "csv", "builtin"]
SPEC_KINDS: tuple[str, ...] = get_args(SpecKind)
BUILTIN_NAMES: tuple[str, ...] = ("fashion-mnist", "digits")

# Options each kind accepts; all are fractions of the train pool carved off when a split is missing.
_OPTIONS: dict[str, tuple[str, ...]] = {
    "folder": ("val", "test"),
    "csv": ("val", "test"),
    "vtab": (),
    "builtin:fashion-mnist": ("val",),
    "builtin:digits": ("val", "test"),
}

_EXAMPLES = (
    "folder:/data/pets, folder:/data/flowers?val=0.1&test=0.2, vtab:/data/vtab-1k/dtd, "
    "csv:/data/labels.csv, builtin:fashion-mnist, builtin:digits"
)


@dataclass(frozen=True)
class DataSpec:
    """A parsed dataset spec.

    Attributes:
        kind: the prefix before the first colon.
        target: the path (resolved, ``~`` expanded) or, for ``builtin``, the dataset name.
        fractions: split fractions given as options (``val``, ``test``), each in [0, 1).
        text: the spec string as given.
    """

    kind: SpecKind
    target: str
    fractions: dict[str, float] = field(default_factory=dict)
    text: str = ""

    @property
    def path(self) -> Path:
        """The target as a path (not meaningful for ``builtin``)."""
        return Path(self.target)


def parse_data_spec(spec: str) -> DataSpec:
    """Parse ``KIND:TARGET[?key=value&...]`` into a `DataSpec`.

    Raises:
        DataError: unknown prefix, unknown builtin name, unknown option or a bad fraction.
    """
    text = spec.strip()
    kind, sep, rest = text.partition(":")
    kind = kind.lower()
    if not sep or kind not in SPEC_KINDS:
        raise DataSpecError(_unknown_prefix_message(text))
    target, _, query = rest.rpartition("?") if "?" in rest else (rest, "", "")
    if kind != "builtin" and "?" in rest and Path(rest).expanduser().exists():
        target, query = rest, ""  # a path with '?' in its name, and no options
    if not target:
        raise DataSpecError(f"Dataset spec {spec!r} names no path or dataset after '{kind}:'.")
    if kind == "builtin":
        target = target.lower()
        if target not in BUILTIN_NAMES:
            raise DataSpecError(
                f"Unknown builtin dataset {target!r} in {spec!r}; valid: "
                + ", ".join(f"builtin:{n}" for n in BUILTIN_NAMES)
                + "."
            )
        allowed = _OPTIONS[f"builtin:{target}"]
    else:
        # absolute, symlinks kept: a linked CSV or list file names images beside the link
        target = os.path.abspath(Path(target).expanduser())
        allowed = _OPTIONS[kind]
    fractions = _parse_fractions(spec, query, allowed)
    return DataSpec(kind=kind, target=target, fractions=fractions, text=text)  # type: ignore[arg-type]


def absolute_data_spec(spec: str) -> str:
    """``spec`` with a relative (or ``~``) path made absolute; builtins and specs that do not
    parse are returned as given (they fail where they are used, with the full message). Runs
    store it, and sweep trials under Ray, which run in another working directory, read it."""
    try:
        parsed = parse_data_spec(spec)
    except DataError:
        return spec
    if parsed.kind == "builtin":
        return spec
    options = "&".join(f"{k}={v!r}" for k, v in parsed.fractions.items())
    return f"{parsed.kind}:{parsed.target}" + (f"?{options}" if options else "")


def _unknown_prefix_message(spec: str) -> str:
    prefixes = ", ".join(f"'{k}:'" for k in SPEC_KINDS)
    hint = ""
    if spec and ":" not in spec and Path(spec).expanduser().exists():
        hint = f" {spec!r} is a path: write 'folder:{spec}', 'vtab:{spec}' or 'csv:{spec}'."
    return (
        f"Unknown dataset spec {spec!r}: it must start with one of {prefixes}.{hint} "
        f"Examples: {_EXAMPLES}."
    )


def _parse_fractions(spec: str, query: str, allowed: tuple[str, ...]) -> dict[str, float]:
    fractions: dict[str, float] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in allowed:
            valid = ", ".join(allowed) if allowed else "none"
            raise DataSpecError(
                f"Unknown option {key!r} in dataset spec {spec!r}; valid options: {valid}."
            )
        if key in fractions:
            raise DataSpecError(
                f"Option {key!r} is given twice in dataset spec {spec!r}; give it once."
            )
        try:
            frac = float(value)
        except ValueError:
            frac = -1.0
        if not 0.0 <= frac < 1.0:
            raise DataSpecError(
                f"Option {key}={value!r} in {spec!r} must be a fraction in [0, 1), e.g. {key}=0.1."
            )
        fractions[key] = frac
    if sum(fractions.values()) >= 1.0:
        raise DataSpecError(
            f"The split fractions in {spec!r} add up to 1 or more; nothing is left to train."
        )
    return fractions
