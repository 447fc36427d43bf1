"""Batch inputs shared by classify, tag and qa.

An `Item` is one input: literal text, a file (read only when its turn comes, so a list of 100,000
paths costs little memory), or stdin. Every record written for it starts with its key: "path" for
files, "id" for everything else. Reading a bad item raises `ItemError`, which becomes an error
record for that item while the run goes on.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import LmtoolError

# An argument that names no file is taken as literal text, unless it looks like a path: one
# word with a folder separator or a usual text-file extension. Those are reported as missing.
_PATH_LIKE = re.compile(r"^\S*(/|\\)\S*$|^\S+\.(txt|md|rst|json|jsonl|csv|tsv|html?|xml|log)$", re.IGNORECASE)
_SNIFF_BYTES = 8192


class ItemError(LmtoolError):
    """One item cannot be processed. kind is a stable word for scripts: missing, unreadable,
    binary, encoding, empty, too-long, invalid."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # items travel between ranks pickled (lmtool.distributed)
        return (ItemError, (self.kind, str(self)))


@dataclass
class Item:
    key: str | int
    key_field: str = "id"  # "path" for files
    text: str | None = None  # literal text; None means read `path`
    path: str | None = None  # a file, or "-" for stdin
    question: str | None = None  # qa only
    error: ItemError | None = None  # known bad before reading (a bad JSON line)

    @property
    def key_text(self) -> str:
        return str(self.key)

    def head(self) -> dict:
        return {self.key_field: self.key}

    def load(self) -> str:
        """The item's text; raises ItemError when it is missing, unreadable, binary, not UTF-8 or empty."""
        if self.error is not None:
            raise self.error
        if self.text is not None:
            text = checked_text(self.text, str(self.key))
        elif self.path == "-":
            text = decode_text(sys.stdin.buffer.read(), "stdin")
        else:
            text = read_text_file(self.path or "")
        if not text.strip():
            raise ItemError("empty", f"{self.key}: empty input")
        return text

    def read_stdin_now(self) -> "Item":
        """The item with stdin read into it, for a rank that hands its inputs to ranks with no stdin."""
        if self.path != "-":
            return self
        try:
            return Item(self.key, self.key_field, text=decode_text(sys.stdin.buffer.read(), "stdin"),
                        question=self.question)
        except ItemError as error:
            return Item(self.key, self.key_field, question=self.question, error=error)

    def error_record(self, error: ItemError) -> dict:
        return {**self.head(), "error": str(error), "error_type": error.kind}


def decode_text(data: bytes, name: str) -> str:
    if b"\x00" in data[:_SNIFF_BYTES]:
        raise ItemError("binary", f"{name}: binary file (contains NUL bytes)")
    try:
        return data.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as exc:
        where = f"byte 0x{data[exc.start]:02x} at offset {exc.start}"
        raise ItemError("encoding", f"{name}: not UTF-8 text ({where})") from None


BOM = "\ufeff"  # an editor's marker of UTF-8, not part of the text


def checked_text(text: str, name: str) -> str:
    """Text that arrived already decoded (arguments, stdin lines, JSON strings), as the tokenizer
    needs it: without a leading byte-order mark, and refused when it holds lone surrogates, which
    is what Python makes of bytes that are not UTF-8 in arguments and stdin (and what a JSON
    "\\udcff" escape gives)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = ord(text[exc.start])
        where = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"character U+{char:04X}"
        raise ItemError("encoding", f"{name}: not UTF-8 text ({where} at character {exc.start})") from None
    return text.removeprefix(BOM)


def read_text_file(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ItemError("missing", f"{path}: no such file") from None
    except IsADirectoryError:
        raise ItemError("unreadable", f"{path}: is a folder, not a file") from None
    except OSError as exc:
        raise ItemError("unreadable", f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode_text(data, path)


def from_arguments(values: Iterable[str], literal: bool = False) -> list[Item]:
    """Positional inputs: '-' is stdin, an existing or path-like name is a file, the rest is text
    (all text with literal=True). Text arguments are numbered from 1 as their id."""
    items = []
    for number, value in enumerate(values, 1):
        if literal:
            items.append(Item(number, text=value))
        elif value == "-":
            items.append(Item("-", path="-"))
        elif _is_path(value):
            items.append(Item(value, key_field="path", path=value))
        else:
            items.append(Item(number, text=value))
    return items


def _is_path(value: str) -> bool:
    if not value.strip() or "\n" in value or len(value) > 4096:
        return False
    try:
        if Path(value).exists():
            return True
    except OSError:  # a name the file system rejects (too long, bad characters) is text
        return False
    return bool(_PATH_LIKE.match(value))


def from_file_list(lines: Iterable[str], source: str = "--files-from") -> list[Item]:
    """--files-from: one path a line; blank lines are skipped, surrounding spaces kept."""
    items = []
    for line in lines:
        if "\x00" in line:
            raise LmtoolError(f"{source}: binary file (contains NUL bytes), not a list of paths")
        path = line.rstrip("\r\n")
        if path.strip():
            items.append(Item(path, key_field="path", path=path))
    return items


def from_jsonl(lines: Iterable[str], source: str, text_fields: tuple[str, ...] = ("text",)) -> list[Item]:
    """--jsonl: objects with "id" (default: the line number) and the first of text_fields that is
    present; "question" is kept for qa. A bad line becomes an item that fails with 'invalid'."""
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        items.append(_jsonl_item(line, number, source, text_fields))
    return items


def _jsonl_item(line: str, number: int, source: str, text_fields: tuple[str, ...]) -> Item:
    where = f"{source}:{number}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return Item(number, error=ItemError("invalid", f"{where}: not a JSON object"))
    if not isinstance(obj, dict):
        return Item(number, error=ItemError("invalid", f"{where}: not a JSON object"))
    key = obj.get("id", number)
    if not isinstance(key, (str, int)) or isinstance(key, bool):
        return Item(number, error=ItemError("invalid", f"{where}: \"id\" must be a string or an integer"))
    field = next((f for f in text_fields if f in obj), text_fields[0])
    text, question = obj.get(field), obj.get("question")
    if not isinstance(text, str):
        return Item(key, error=ItemError("invalid", f"{where}: needs a string field \"{field}\""))
    if question is not None and not isinstance(question, str):
        return Item(key, error=ItemError("invalid", f"{where}: \"question\" must be a string"))
    try:
        question = None if question is None else checked_text(question, where)
        text = checked_text(text, where)
    except ItemError as exc:
        return Item(key, error=exc)
    return Item(key, text=text, question=question)
