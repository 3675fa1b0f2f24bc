"""``vprompt data``: look at a dataset before training on it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from vprompt.errors import DataError

if TYPE_CHECKING:
    from vprompt.data import DataSplits

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


@app.callback()
def _group() -> None:
    """Inspect datasets given as spec strings (folder:, vtab:, csv:, builtin:)."""


@app.command()
def inspect(
    spec: Annotated[str, typer.Argument(help="Dataset spec, e.g. builtin:digits or folder:PATH.")],
    out: Annotated[Path, typer.Option(help="PNG grid of sample images per class.")] = Path(
        "data-grid.png"
    ),
    per_class: Annotated[int, typer.Option(min=1, help="Images per class in the grid.")] = 8,
    split: Annotated[
        str, typer.Option(help="Split shown in the grid: train, val or test.")
    ] = "train",
    max_classes: Annotated[int, typer.Option(min=1, help="Classes shown in the grid.")] = 30,
    train_size: Annotated[int | None, typer.Option(help="Subsample train to this size.")] = None,
    val_size: Annotated[int | None, typer.Option(help="Subsample val to this size.")] = None,
    test_size: Annotated[int | None, typer.Option(help="Subsample test to this size.")] = None,
    seed: Annotated[
        int, typer.Option("--data-seed", "--seed", help="Data seed (carving, subsampling, grid).")
    ] = 0,
    skip_bad: Annotated[bool, typer.Option(help="Drop unreadable images up front.")] = False,
    merge_train_val: Annotated[bool, typer.Option(help="Train on train + val.")] = False,
) -> None:
    """Print split sizes and per-class counts, and write a PNG grid of sample images."""
    from vprompt.cli.train import cli_errors
    from vprompt.data import build_splits

    console = Console(emoji=False)
    with cli_errors():
        splits = build_splits(
            spec,
            train_size=train_size,
            val_size=val_size,
            test_size=test_size,
            seed=seed,
            skip_bad=skip_bad,
            merge_train_val=merge_train_val,
        )
        shown = splits.datasets().get(split)
        if shown is None:
            raise DataError(
                f"Split {split!r} does not exist here; choose one of {', '.join(splits.datasets())}."
            )
        from vprompt.data.inspect import save_grid

        console.print(count_table(splits))
        console.print(f"source: {splits.layout}", highlight=False, soft_wrap=True)
        path = save_grid(shown, out, per_class, seed, max_classes, title=f"{spec} - {split}")
    console.print(f"wrote {path}", highlight=False)


def count_table(splits: DataSplits) -> Table:
    """A rich table: one row per class, one column per split, totals last."""
    counts = splits.class_counts()
    table = Table(title=f"{splits.spec}  ({splits.num_classes} classes)")
    table.add_column("#", justify="right", style="dim")
    table.add_column("class")
    for name in counts:
        table.add_column(name, justify="right")
    for c, name in enumerate(splits.class_names):
        table.add_row(str(c), name, *(str(v[c]) for v in counts.values()))
    table.add_section()
    table.add_row("", "total", *(str(n) for n in splits.split_sizes().values()), style="bold")
    skipped = {k: len(v) for k, v in splits.skipped.items() if v}
    if skipped:
        table.add_row("", "skipped", *(str(skipped.get(k, 0)) for k in counts), style="yellow")
    return table
