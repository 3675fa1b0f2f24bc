"""``vprompt eval`` and ``vprompt predict``: parse, then call `vprompt.engine.inference`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from vprompt.cli.train import EXIT_ERROR, cli_errors

Opt = typer.Option

BACKBONE_HELP = (
    "Backbone spec to load instead of the one the task names (its checkpoint moved, say); "
    "its weights must be the task's."
)


def _format_eval(report: dict[str, Any]) -> str:
    lines = [
        f"{report['split']} of {report['data']}: {report['n']} images"
        + (" (a stratified subsample" if report.get("size") else " (all")
        + f", data seed {report.get('seed')})",
        f"top-1 {100 * report['top1']:.2f}%   top-5 {100 * report['top5']:.2f}%   "
        f"loss {report['loss']:.4f}",
        "per class:",
    ]
    width = max(5, *(len(n) for n in report["per_class"]))
    for name, acc in report["per_class"].items():
        lines.append(f"  {name:<{width}}  " + ("n/a" if acc is None else f"{100 * acc:6.2f}%"))
    lines.append(f"wrote {report['out']}/metrics.json and confusion.png")
    return "\n".join(lines)


def eval_command(
    task_dir: Annotated[
        Path, typer.Argument(help="Task folder (a run's task/, or the run folder).")
    ],
    data: Annotated[str, Opt(help="Dataset spec with the task's classes.")],
    split: Annotated[Literal["train", "val", "test"], Opt(help="Split to evaluate.")] = "test",
    as_json: Annotated[bool, Opt("--json", help="Print the metrics as JSON.")] = False,
    out: Annotated[
        Path | None,
        Opt(help="Folder for metrics.json and confusion.png (default: RUN_DIR/eval-SPLIT)."),
    ] = None,
    size: Annotated[
        int | None,
        Opt(
            min=1,
            help="Evaluate a stratified subsample of N images (default: on the task's own "
            "training data, the subsample training reported on; else the whole split).",
        ),
    ] = None,
    batch_size: Annotated[int, Opt(min=1, help="Images per forward.")] = 64,
    device: Annotated[Literal["auto", "cpu", "cuda"], Opt(help="Device.")] = "auto",
    workers: Annotated[int, Opt(min=0, help="DataLoader workers.")] = 0,
    seed: Annotated[
        int | None,
        Opt(
            "--data-seed",
            "--seed",
            help="Data seed for subsets and carved splits (default: the task's training data "
            "seed); --data-seed as in `vprompt train`.",
        ),
    ] = None,
    backbone: Annotated[str | None, Opt(help=BACKBONE_HELP)] = None,
    skip_bad: Annotated[
        bool,
        Opt(
            "--skip-bad",
            help="Drop missing and unreadable images up front and list them (default: as the "
            "task's training did on its own data, else stop at the first one).",
        ),
    ] = False,
    quiet: Annotated[bool, Opt("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Top-1, top-5, per-class accuracy and a confusion matrix of a task on a dataset split."""
    from vprompt.engine.inference import evaluate_task

    with cli_errors():
        report = evaluate_task(
            task_dir,
            data,
            split,
            out=out,
            size=size,
            batch_size=batch_size,
            device=device,
            workers=workers,
            seed=seed,
            backbone=backbone,
            skip_bad=skip_bad or None,
            progress=not quiet,
        )
        typer.echo(json.dumps(report) if as_json else _format_eval(report))


def predict_command(
    task_dir: Annotated[
        Path, typer.Argument(help="Task folder (a run's task/, or the run folder).")
    ],
    images: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.")],
    top_k: Annotated[int, Opt(min=1, help="Labels per image (at most the task's classes).")] = 5,
    batch_size: Annotated[int, Opt(min=1, help="Images per forward.")] = 32,
    device: Annotated[Literal["auto", "cpu", "cuda"], Opt(help="Device.")] = "auto",
    backbone: Annotated[str | None, Opt(help=BACKBONE_HELP)] = None,
) -> None:
    """Top-k labels and probabilities, one JSON line per image; unreadable images give an
    ``error`` line and a nonzero exit status at the end."""
    from vprompt.engine.inference import (
        IMAGE_SUFFIXES,
        expand_inputs,
        load_task_model,
        predict_images,
    )
    from vprompt.errors import DataError

    failed = 0
    with cli_errors():
        paths = expand_inputs(images)
        if not paths:
            raise DataError(
                f"no images found in {' '.join(images)} (looked for "
                f"{', '.join(sorted(IMAGE_SUFFIXES))}, folders searched recursively)"
            )
        model = load_task_model(task_dir, device, backbone)
        for record in predict_images(model, paths, top_k=top_k, batch_size=batch_size):
            failed += "error" in record
            typer.echo(json.dumps(record))
    if failed:
        typer.echo(f"error: {failed} of {len(paths)} images could not be read", err=True)
        raise typer.Exit(EXIT_ERROR)


def register(app: typer.Typer) -> None:
    """Add ``eval`` and ``predict`` to the ``vprompt`` app."""
    app.command("eval")(eval_command)
    app.command("predict")(predict_command)
