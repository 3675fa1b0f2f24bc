"""``vprompt methods``: the registered tuning methods with their options and defaults."""

from __future__ import annotations

import dataclasses
import json

import typer
from rich.console import Console
from rich.table import Table

from vprompt.methods import get_method_class, list_methods


def method_options(name: str) -> list[dict[str, str]]:
    """Each option of a method's config: name, type and default, as strings."""
    cfg_cls = get_method_class(name).config_class
    rows = []
    for f in dataclasses.fields(cfg_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append({"option": f.name, "type": str(f.type), "default": repr(default)})
    return rows


def methods(
    name: str = typer.Argument(None, help="Show one method only."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the tuning methods, their options and defaults."""
    names = [name] if name else list_methods()
    if as_json:
        typer.echo(json.dumps({n: method_options(n) for n in names}, indent=2))
        return
    console = Console()
    for n in names:
        cls = get_method_class(n)
        doc = (cls.config_class.__doc__ or "").strip().splitlines()[0]
        table = Table(title=f"{n}: {doc}", title_justify="left", show_lines=False)
        for col in ("option", "type", "default"):
            table.add_column(col)
        for row in method_options(n):
            table.add_row(row["option"], row["type"], row["default"])
        console.print(table)


def register(app: typer.Typer) -> None:
    app.command("methods")(methods)
