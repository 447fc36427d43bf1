"""The `lmtool` command. Each command lives in its own module and is a thin layer: parse the
options, call the library, render the result. Errors become one line on stderr and an exit code
(see lmtool.errors.ExitCode and the README); --debug shows the traceback instead."""

from __future__ import annotations

import functools
import re
import signal
import sys

import typer

from .. import __version__
from ..errors import ExitCode, Interrupted, LmtoolError
from .common import err, settings
from .core import DEBUG_HELP, QUIET_HELP, LmtoolCommand, LmtoolGroup

app = typer.Typer(
    name="lmtool",
    help="Convert, inspect and run language-model checkpoints (Gemma, BLOOM, RecurrentGemma, Zamba2).",
    cls=LmtoolGroup,
    epilog="Run `lmtool COMMAND -h` for a command's options and examples.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lmtool {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    settings.quiet = quiet
    settings.debug = debug


from . import bench as _bench  # noqa: E402,F401
from . import convert as _convert  # noqa: E402,F401  (each module registers its command on `app`)
from . import generate as _generate  # noqa: E402,F401
from . import inspect as _inspect  # noqa: E402,F401
from . import quantize as _quantize  # noqa: E402,F401
from . import tasks as _tasks  # noqa: E402,F401
from . import completion as _completion  # noqa: E402,F401
from . import recipes as _recipes  # noqa: E402,F401


@functools.cache
def build() -> typer.core.TyperGroup:
    """The click command tree, every command an LmtoolCommand (shared options, readable help)."""
    for info in app.registered_commands:
        if info.cls in (None, typer.core.TyperCommand):
            info.cls = LmtoolCommand
    return typer.main.get_command(app)


def main(argv: list[str] | None = None) -> None:
    # When the reader of stdout goes away (`| head`), stop quietly as cat and grep do, instead of
    # raising BrokenPipeError from whatever write comes next.
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        # Click returns a command's typer.Exit(code) instead of raising it when not standalone;
        # Typer also turns a KeyboardInterrupt that no command caught into Exit(130).
        code = build().main(args=argv, prog_name="lmtool", standalone_mode=False)
        if code == ExitCode.INTERRUPTED:
            err.print("interrupted")
        if isinstance(code, int) and code:
            sys.exit(code)
    except LmtoolError as exc:
        _fail(exc, "" if isinstance(exc, Interrupted) else "error: ", str(exc), exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        err.print("interrupted")
        sys.exit(ExitCode.INTERRUPTED)
    except MemoryError as exc:
        _fail(exc, "error: ", "out of memory", ExitCode.ERROR)
    except OSError as exc:
        # A full disk (`-o /dev/full`, `> /dev/full`), a vanished folder: one line naming the file.
        where = exc.filename or "output"
        _fail(exc, "error: ", f"{where}: {exc.strerror or exc}", ExitCode.ERROR)
    except Exception as exc:
        # Typer vendors Click, whose usage errors carry show() and exit_code (2).
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        if _out_of_memory(exc):
            asked = re.search(r"allocate (\d+) bytes", str(exc))
            size = f": could not allocate {int(asked.group(1)) / 1e9:,.1f} GB" if asked else ""
            _fail(exc, "error: ", f"out of memory{size}", ExitCode.ERROR)
        raise


def _fail(exc: BaseException, prefix: str, message: str, code: int) -> None:
    """One line on stderr (the traceback with --debug) and the exit code, the same either way."""
    if settings.debug:
        import traceback

        traceback.print_exception(exc)
    else:
        err.print(f"{prefix}{message}", markup=False)
    sys.exit(code)


def _out_of_memory(exc: Exception) -> bool:
    """torch's allocation failures: OutOfMemoryError on CUDA, a RuntimeError on CPU."""
    return type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )
