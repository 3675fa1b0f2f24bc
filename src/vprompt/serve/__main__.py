"""``python -m vprompt.serve --task NAME=DIR ...``: the ``vprompt serve`` command on its own."""

from __future__ import annotations

import typer

from vprompt.cli.serve import register

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
register(app)

if __name__ == "__main__":
    app(prog_name="python -m vprompt.serve")
