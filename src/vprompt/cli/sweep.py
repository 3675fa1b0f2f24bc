"""``vprompt sweep`` and ``vprompt suite``: parse the flags, then call `vprompt.sweep`.

Both commands take ``vprompt train``'s flags, read from `vprompt.cli.train.train`'s signature
(so a flag added to ``train`` appears here too), minus the ones the protocol owns, plus their
own. ``--lr`` / ``--wd`` become comma-separated grids; ``--workers`` means trials at once
(``--loader-workers`` is train's DataLoader ``--workers``).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

import typer

from vprompt.cli import train as train_cli
from vprompt.errors import ConfigError

Opt = typer.Option

DROPPED_TRAIN_FLAGS = (
    "lr",
    "wd",
    "out",
    "resume",
    "overwrite",
    "merge_train_val",
    "select",
    "evaluate_test",
    "workers",
)
"""``vprompt train`` flags a sweep does not take: searched, replaced, or set by the protocol."""

EXIT_INTERRUPTED = 130


def _sweep_flags(
    out: Annotated[
        Path | None, Opt(help="Output directory (created; run the same command again to resume).")
    ] = None,
    lr: Annotated[
        str | None,
        Opt(help="Base lr grid, comma-separated (default: the method's grid; VPT: 0.05,...,50)."),
    ] = None,
    wd: Annotated[
        str | None,
        Opt(
            help="Weight decay grid, comma-separated (default: the method's grid; VPT: 0.01,0.001,0.0001,0)."
        ),
    ] = None,
    seeds: Annotated[int, Opt(help="Final runs on train + val, seeds SEED, SEED+1, ...")] = 5,
    search: Annotated[
        Literal["grid", "halving"],
        Opt(help="grid: every point, all epochs; halving: successive halving."),
    ] = "grid",
    eta: Annotated[int, Opt(help="Halving: keep the best 1/ETA at each rung.")] = 3,
    min_epochs: Annotated[int, Opt(help="Halving: epochs of the first rung.")] = 1,
    backend: Annotated[
        Literal["local", "ray"], Opt(help="local: this machine; ray: Ray Tune.")
    ] = "local",
    workers: Annotated[
        int, Opt(help="Trials at once: processes (local) or concurrent Ray trials.")
    ] = 1,
    loader_workers: Annotated[
        int | None, Opt(help="DataLoader workers per trial (train's --workers; default 0).")
    ] = None,
    storage: Annotated[
        str | None, Opt(help="Optuna storage URL (default: sqlite:///OUT/sweep.db).")
    ] = None,
    study_name: Annotated[
        str | None, Opt(help="Optuna study name (default: derived from the options).")
    ] = None,
    ray_address: Annotated[
        str | None,
        Opt(help="Ray cluster address (auto, ray://HOST:10001; default: start a local Ray)."),
    ] = None,
    cpus_per_trial: Annotated[
        float | None, Opt(help="Ray: CPUs reserved per trial (default: CPUs / workers).")
    ] = None,
) -> None:
    """Template: the options ``sweep`` and ``suite`` add to train's flags."""


def _suite_flags(
    data: Annotated[list[str] | None, Opt(help="A dataset spec; repeat for several.")] = None,
    suite: Annotated[
        Path | None,
        Opt(help="YAML file of datasets in groups (natural / specialized / structured)."),
    ] = None,
    method: Annotated[
        str | None, Opt(help="Method(s), comma-separated: one table row each.")
    ] = None,
) -> None:
    """Template: the options ``suite`` adds (``--data`` repeatable, ``--method`` a list)."""


def _parameters(fn: Callable[..., Any], drop: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """``fn``'s parameters with resolved annotations, as keyword-only parameters."""
    hints = get_type_hints(fn, include_extras=True)
    return [
        p.replace(annotation=hints[p.name], kind=inspect.Parameter.KEYWORD_ONLY)
        for p in inspect.signature(fn).parameters.values()
        if p.name not in drop
    ]


def _command(
    impl: Callable[..., None], params: list[inspect.Parameter], doc: str
) -> Callable[..., None]:
    """A function typer can read: ``params`` as its signature, calling ``impl(**kwargs)``."""

    def command(**kwargs: Any) -> None:
        impl(**kwargs)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    return command


SWEEP_KEYS = tuple(p.name for p in _parameters(_sweep_flags))
SUITE_KEYS = tuple(p.name for p in _parameters(_suite_flags))


def train_values(flags: dict[str, Any]) -> dict[str, Any]:
    """Training options from train's flags, merged as ``vprompt train`` merges them (a config
    file's protocol options dropped by `strip_protocol`)."""
    values = train_cli.option_values(flags, file_filter=strip_protocol)
    searched = sorted({"lr", "wd"} & set(values))  # only --set can bring them here
    if searched:
        raise ConfigError(f"a sweep searches {searched}: give the grid with --lr / --wd, not --set")
    return values


def method_option_split(methods: list[str], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each method's share of the method options (``--prompt-len`` goes to the prompt methods
    of a suite that also has ``linear``); an option no method has is an error."""
    from vprompt.methods import get_method_class

    per_method: dict[str, dict[str, Any]] = {}
    for m in methods:
        known = {f.name for f in get_method_class(m).config_class.options()}
        per_method[m] = {k: v for k, v in options.items() if k in known}
    unused = sorted(k for k in options if not any(k in o for o in per_method.values()))
    if unused:
        raise ConfigError(f"no method of the suite ({', '.join(methods)}) has option(s) {unused}")
    return per_method


def strip_protocol(values: dict[str, Any]) -> dict[str, Any]:
    """Drop a config file's lr / wd (the grid replaces them) and protocol options at their
    protocol value; other protocol values are an error."""
    out = {k: v for k, v in values.items() if k not in ("lr", "wd")}
    if out.get("merge_train_val") is False:
        out.pop("merge_train_val")
    if out.get("select") == "last":
        out.pop("select")
    if out.get("evaluate_test") is True:
        out.pop("evaluate_test")
    return out


def make_spec(values: dict[str, Any], opts: dict[str, Any]) -> Any:
    """The `SweepSpec` of training ``values`` and sweep options ``opts``."""
    from vprompt.sweep import SweepSpec

    if opts.get("loader_workers") is not None:
        values = {**values, "workers": opts["loader_workers"]}
    return SweepSpec(
        values,
        lrs=opts["lr"],
        wds=opts["wd"],
        search=opts["search"],
        eta=opts["eta"],
        min_epochs=opts["min_epochs"],
        seeds=opts["seeds"],
    )


def _backend(opts: dict[str, Any], out: Path) -> Any:
    from vprompt.sweep import make_backend

    return make_backend(
        opts["backend"],
        opts["workers"],
        ray_address=opts["ray_address"],
        cpus_per_trial=opts["cpus_per_trial"],
        out=out,
    )


def _logger(quiet: bool) -> Callable[[str], None]:
    return (lambda _m: None) if quiet else (lambda m: typer.echo(m, err=True))


def _run(body: Callable[[], str]) -> None:
    """Run ``body`` under train's error handling; print its summary line."""
    from vprompt.engine.trainer import TrainingInterrupted

    with train_cli.cli_errors():
        try:
            line = body()
        except TrainingInterrupted as e:
            typer.echo(f"interrupted: {e}; run the same command again to resume", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
    typer.echo(line)
    sys.stdout.flush()


def _sweep_impl(**kwargs: Any) -> None:
    opts = {k: kwargs.pop(k) for k in SWEEP_KEYS}
    quiet = bool(kwargs.get("quiet"))

    def body() -> str:
        from vprompt.sweep import run_sweep

        if opts["out"] is None:
            raise ConfigError("missing --out DIR (the sweep's outputs; rerun to resume)")
        spec = make_spec(train_values(kwargs), opts)
        with contextlib.closing(_backend(opts, opts["out"])) as backend:
            result = run_sweep(
                spec,
                opts["out"],
                backend=backend,
                storage=opts["storage"],
                study_name=opts["study_name"],
                log=_logger(quiet),
            )
        return result.summary_line()

    _run(body)


def _suite_impl(**kwargs: Any) -> None:
    opts = {k: kwargs.pop(k) for k in SWEEP_KEYS}
    suite_opts = {k: kwargs.pop(k) for k in SUITE_KEYS}
    quiet = bool(kwargs.get("quiet"))

    def body() -> str:
        from vprompt.sweep.suite import datasets_from_specs, load_suite_file, run_suite

        if opts["out"] is None:
            raise ConfigError("missing --out DIR (the suite's outputs; rerun to resume)")
        if opts["study_name"] is not None:
            raise ConfigError("--study-name names one sweep; a suite names each dataset's study")
        datasets = load_suite_file(suite_opts["suite"]) if suite_opts["suite"] else []
        datasets += datasets_from_specs(suite_opts["data"] or [])
        methods = [m.strip() for m in (suite_opts["method"] or "").split(",") if m.strip()]
        values = train_values(kwargs)
        for key, flag in (("method", "--method"), ("data", "--data / --suite")):
            if key in values:  # from --config: a suite takes them from its own flags
                raise ConfigError(
                    f"the --config file sets {key!r}, which a suite takes from {flag}; "
                    "drop it from the file"
                )
        per_method = method_option_split(methods, values.pop("method_options", None) or {})

        def spec_for(method: str, data: str) -> Any:
            options = {"method_options": per_method[method]} if per_method[method] else {}
            return make_spec({**values, **options, "method": method, "data": data}, opts)

        with contextlib.closing(_backend(opts, opts["out"])) as backend:
            result = run_suite(
                datasets,
                methods,
                spec_for,
                opts["out"],
                log=_logger(quiet),
                backend=backend,
                storage=opts["storage"],
            )
        typer.echo(result.markdown())
        return f"suite: {len(methods)} method(s) x {len(datasets)} dataset(s) -> {opts['out']}"

    _run(body)


def sweep_command() -> Callable[..., None]:
    """``vprompt sweep``: train's flags (minus the protocol's) plus the sweep's."""
    params = _parameters(train_cli.train, DROPPED_TRAIN_FLAGS) + _parameters(_sweep_flags)
    return _command(_sweep_impl, params, SWEEP_DOC)


def suite_command() -> Callable[..., None]:
    """``vprompt suite``: ``sweep``'s flags with ``--data`` repeatable and ``--suite FILE``."""
    train = _parameters(train_cli.train, (*DROPPED_TRAIN_FLAGS, "data", "method"))
    return _command(
        _suite_impl, train + _parameters(_sweep_flags) + _parameters(_suite_flags), SUITE_DOC
    )


SWEEP_DOC = """Tune lr x wd with the VPT protocol, retrain the choice on train + val with several
seeds and report test mean and std (see docs/sweeps.md)."""

SUITE_DOC = """Run the sweep protocol on many datasets and print the per-dataset and per-group
table in the papers' format (see docs/sweeps.md)."""


def register(app: typer.Typer) -> None:
    """Add ``sweep`` and ``suite`` to the ``vprompt`` app."""
    app.command("sweep")(sweep_command())
    app.command("suite")(suite_command())
