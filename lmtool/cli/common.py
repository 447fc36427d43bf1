"""What every command shares: the stderr console, progress bars, reading inputs, JSON output."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .. import choices
from ..errors import LmtoolError, stdout_error


@dataclass
class Settings:
    quiet: bool = False
    debug: bool = False


settings = Settings()


# --- options that take domain values (lmtool.choices) ----------------------------------------------
# Each lists its choices in the help and completion; an unknown value is a usage error (exit 2).

def choice_parser(allowed: tuple[str, ...], aliases: dict[str, str] | None = None):
    """A parser for typer's `parser=`: the value itself, or the choice an alias stands for."""
    aliases = aliases or {}

    def parse(value: str) -> str:
        chosen = aliases.get(value, value)
        if chosen not in allowed:
            raise typer.BadParameter(f"'{value}' is not one of {', '.join(allowed)}")
        return chosen

    return parse


def parse_dtype(value: str) -> str:
    chosen = choices.canonical_dtype(value)
    if chosen is None:
        aliases = ", ".join(choices.DTYPE_ALIASES)
        raise typer.BadParameter(f"'{value}' is not one of {', '.join(choices.DTYPE_CHOICES)} ({aliases})")
    return chosen


def parse_dtype_list(value: str) -> str:
    """A comma list of dtypes (bench sweeps), each checked as --dtype is."""
    return ",".join(parse_dtype(v.strip()) for v in value.split(",") if v.strip())


def parse_device(value: str) -> str:
    if not choices.is_device(value):
        raise typer.BadParameter(f"'{value}' is not one of {', '.join(choices.DEVICE_CHOICES)} or cuda:N")
    return value


def metavar(values: tuple[str, ...]) -> str:
    return "[" + "|".join(values) + "]"


DTYPE_METAVAR = metavar(choices.DTYPE_CHOICES)
DEVICE_METAVAR = "[auto|cpu|cuda|cuda:N]"


def dtype_option(default: str = "auto", help: str = "Weights and compute dtype; auto = the checkpoint's.") -> Any:
    aliases = "/".join(choices.DTYPE_ALIASES)
    return typer.Option(default, "--dtype", parser=parse_dtype, metavar=DTYPE_METAVAR, help=f"{help} ({aliases} accepted)")


def threads_option() -> Any:
    return typer.Option(
        None, "--threads", min=1, metavar="N",
        help="CPU threads for the model (default: 1 for a model under 32 MB, else one per core).",
    )


def device_option(default: str = "auto", help: str = "auto = cuda when available, else cpu.") -> Any:
    return typer.Option(default, "--device", parser=parse_device, metavar=DEVICE_METAVAR, help=help)
# Diagnostics and progress go to stderr; stdout carries results only.
err = Console(stderr=True, highlight=False, soft_wrap=True)


def out(text: str = "", end: str = "\n") -> None:
    try:
        sys.stdout.write(text + end)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise stdout_error(exc) from None


def out_json(obj: Any) -> None:
    out(json.dumps(obj, ensure_ascii=False))


def info(message: str) -> None:
    if not settings.quiet:
        err.print(message)


def progress_enabled() -> bool:
    return not settings.quiet and err.is_terminal


@contextmanager
def progress(description: str, total: float | None, unit_bytes: bool = False) -> Iterator[Any]:
    """A rich progress bar on stderr, or a do-nothing stand-in when stderr is not a terminal."""
    if not progress_enabled():
        yield _NoProgress()
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    if unit_bytes:
        from rich.progress import DownloadColumn

        columns[2] = DownloadColumn()
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield _Advance(bar, task)


class _Advance:
    def __init__(self, bar: Progress, task: Any):
        self.bar, self.task = bar, task

    def advance(self, amount: float = 1) -> None:
        self.bar.advance(self.task, amount)

    def set_total(self, total: float) -> None:
        self.bar.update(self.task, total=total)


class _NoProgress:
    def advance(self, amount: float = 1) -> None:
        pass

    def set_total(self, total: float) -> None:
        pass


def read_text_arg(value: str, what: str = "input") -> str:
    """A literal argument, or '-' for all of stdin."""
    if value != "-":
        return value
    if sys.stdin.isatty():
        raise LmtoolError(f"{what}: '-' reads stdin, but stdin is a terminal")
    return sys.stdin.read()


def open_lines(path: str) -> Iterator[str]:
    """Lines of a file, or of stdin for '-', without a leading UTF-8 byte-order mark."""
    if path == "-":
        for number, line in enumerate(sys.stdin):
            yield line.removeprefix("\ufeff") if number == 0 else line
        return
    try:
        with open(Path(path), encoding="utf-8-sig") as f:
            yield from f
    except FileNotFoundError:
        raise LmtoolError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise LmtoolError(f"{path}: not UTF-8 text") from None
    except IsADirectoryError:
        raise LmtoolError(f"{path}: is a folder, not a file") from None
