"""JSON Lines results, and --resume over an earlier run's output file."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import IO

from ..errors import LmtoolError, stdout_error


def record_key(record: dict) -> str | None:
    key = record.get("id", record.get("path"))
    return None if key is None else str(key)


def resume_keys(path: str | Path) -> set[str]:
    """Keys of the items an earlier run finished, read from its output file.

    The file is rewritten without its error records (those items run again) and without a last
    line cut short by an interruption. Any other line that is not a JSON record stops the run:
    the file is probably not an output of this command, and resuming must not damage it.
    """
    path = Path(path)
    if not path.exists():
        return set()
    lines, torn = read_lines(path)
    keys: set[str] = set()
    kept: list[str] = []
    for line, record in lines:
        if "error" in record or record_key(record) is None:
            continue
        keys.add(record_key(record))
        kept.append(line if line.endswith("\n") else line + "\n")
    if torn or len(kept) != len(lines):
        _replace(path, "".join(kept))
    return keys


def read_lines(path: Path) -> tuple[list[tuple[str, dict]], bool]:
    """Each line of a JSON Lines output with its record, and whether a last line cut short by an
    interruption was left out. Any other line that is not a JSON record is an error: the file is
    probably not an output of this command, and resuming must not damage it."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as exc:
        raise LmtoolError(f"{path}: cannot read it to resume ({exc})") from None
    parsed = []
    for number, line in enumerate(lines, 1):
        record = _parse(line)
        if record is None:
            if number == len(lines) and not line.endswith("\n"):
                return parsed, True  # the write an interruption cut short
            raise LmtoolError(f"{path}:{number}: not a JSON record; is this an output of this command?")
        parsed.append((line, record))
    return parsed, False


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _replace(path: Path, content: str) -> None:
    temporary = path.with_name(path.name + ".resume-tmp")
    temporary.write_text(content, encoding="utf-8")
    os.replace(temporary, path)


class JsonlWriter:
    """One JSON object a line, to a file (appended to when resuming) or stdout; flushed per record
    so an interrupted run keeps everything it wrote."""

    def __init__(self, path: str | None = None, append: bool = False):
        self.path = path
        self._file: IO[str] = sys.stdout
        if path is not None:
            try:
                self._file = open(path, "a" if append else "w", encoding="utf-8")
            except OSError as exc:
                raise LmtoolError(f"{path}: cannot write ({exc.strerror or exc})") from None

    def write(self, record: dict) -> None:
        try:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:  # a full disk: one line naming the file
            raise (stdout_error(exc) if self.path is None else self._write_error(exc)) from None

    def close(self) -> None:
        if self._file is not sys.stdout:
            try:
                self._file.close()  # flushes what a failed write left in the buffer, failing again
            except OSError as exc:
                raise self._write_error(exc) from None

    def _write_error(self, exc: OSError) -> LmtoolError:
        return LmtoolError(f"{self.path}: cannot write ({exc.strerror or exc})")
