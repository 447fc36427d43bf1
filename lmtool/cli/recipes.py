"""lmtool recipes: the recipes --recipe takes, one line each."""

from __future__ import annotations

from typing import Optional

import typer

from .. import recipes as recipe_files
from ..choices import FAMILIES
from . import app
from .common import choice_parser, metavar, out, out_json


@app.command("recipes")
def recipes_command(
    family: Optional[str] = typer.Option(
        None, "--family", parser=choice_parser(FAMILIES), metavar=metavar(FAMILIES), help="Only this family's."
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per recipe."),
) -> None:
    """List the recipes (recipes/*.yaml, and $LMTOOL_RECIPES): name, kind, model or command, description."""
    found = [recipe_files.load(name) for name in recipe_files.names()]
    found = [r for r in found if family is None or r.family == family]
    if as_json:
        for r in found:
            out_json({"name": r.name, "kind": r.kind, "model": r.model, "family": r.family, "command": r.command,
                      "description": r.description, "path": str(r.path), "options": r.options, "original": r.original})
        return
    rows = [(r.name, r.kind, r.model or f"lmtool {r.command}", r.description) for r in found]
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(3)]
    for row in rows:
        out("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
