"""The `lmtool` console script.

Shell completion asks for the values that change between TAB presses (`lmtool __complete models`,
`... recipes`): they are answered here with the standard library alone, in the time Python takes to
start. Everything else goes to lmtool.cli.
"""

from __future__ import annotations

import sys

COMPLETION_REQUEST = "__complete"


def complete_values(kind: str) -> list[str]:
    """models: Hub ids in the local huggingface_hub cache; recipes: recipe names."""
    if kind == "models":
        from .hub import cached_model_ids

        return cached_model_ids()
    if kind == "recipes":
        from .recipes import names

        return names()
    return []


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == [COMPLETION_REQUEST]:
        for value in complete_values(args[1] if len(args) > 1 else ""):
            print(value)
        return
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        # Ctrl-C while the command's modules still import: one line and 130, as once it runs.
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    cli_main()
