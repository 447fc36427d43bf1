"""Errors that the CLI turns into one line on stderr and a documented exit code.

Library code raises these with a message that names the input and the problem; anything else that
escapes is a bug and gets a traceback only with --debug.
"""

from __future__ import annotations


class ExitCode:
    OK = 0
    ERROR = 1  # bad input, unreadable or inconsistent file, runtime failure
    USAGE = 2  # bad command line (Click's own code)
    NOT_FOUND = 3  # a model reference that cannot be resolved: missing, gated, offline, unreachable
    UNSUPPORTED = 4  # a family, architecture, task or format lmtool does not handle
    PARTIAL = 5  # a batch finished but some of its items failed
    QUALITY = 6  # quantize: the quantized model is below the quality gates (OUT is still written)
    INTERRUPTED = 130


class LmtoolError(Exception):
    """An expected failure: its message is shown as is, without a traceback."""

    exit_code = ExitCode.ERROR


class ModelNotFoundError(LmtoolError):
    exit_code = ExitCode.NOT_FOUND


class UnsupportedError(LmtoolError):
    exit_code = ExitCode.UNSUPPORTED


class ConfigError(LmtoolError):
    """A config.json value that is missing, of the wrong type, or inconsistent."""


class CheckpointError(LmtoolError):
    """A weight file that is unreadable, truncated, or does not match the config."""


class Interrupted(LmtoolError):
    """Ctrl-C, caught where a command runs: the message says how far it got (shown without the
    "error:" prefix)."""

    exit_code = ExitCode.INTERRUPTED


def stdout_error(exc: OSError) -> LmtoolError:
    """stdout cannot be written (a full disk behind `> FILE`). Later writes, and the interpreter's
    final flush, go to devnull so that the one-line error stays the only one."""
    import os
    import sys

    sys.stdout = open(os.devnull, "w")
    return LmtoolError(f"stdout: cannot write ({exc.strerror or exc})")
