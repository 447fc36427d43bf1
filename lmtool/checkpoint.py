"""Reading and writing the standard layout: safetensors files, sharded with an index.

Reading maps each file copy-on-write and makes tensors that point into the mapping, so loading
a checkpoint in its own dtype makes no second copy in RAM. Writing streams: the header is written
from a plan of names, shapes and dtypes, then tensors are produced and written one at a time, so a
conversion holds about one tensor in memory. Output folders are built under a temporary name
beside the destination and renamed into place only when complete.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import CheckpointError, LmtoolError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)


def read_header(path: Path, prefix: bytes | None = None) -> tuple[int, dict]:
    """(header length, header dict) of a safetensors file, validated; prefix is the file's first
    bytes when they were fetched without the file (Hub range requests)."""
    try:
        if prefix is None:
            with open(path, "rb") as f:
                head = f.read(8)
                (n,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
                if n is None:
                    raise CheckpointError(f"{path}: too short to be a safetensors file")
                if n > 100_000_000:
                    raise CheckpointError(f"{path}: not a safetensors file (header length {n})")
                raw = f.read(n)
        else:
            (n,) = struct.unpack("<Q", prefix[:8])
            raw = prefix[8 : 8 + n]
        if len(raw) != n:
            raise CheckpointError(f"{path}: truncated safetensors header")
        header = json.loads(raw)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError, struct.error):
        raise CheckpointError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not an object)")
    return n, header


def map_weights(path: Path) -> mmap.mmap:
    """A file of weights mapped copy-on-write: the pages stay shared with the page cache unless a
    tensor is modified in place, and nothing we do can write to the file.

    The mapping asks for huge pages (MADV_HUGEPAGE): where the file is read from disk through it,
    Linux then fills the page cache with 2 MB folios and maps them whole, where plain readahead
    mapped about two thirds of Gemma-2B that way and a file cached page by page none. Decoding
    streams every weight per token, and 4 KB pages cost it a page walk every 4 KB: Gemma-2B's
    batch-1 step ran 1.04-1.05x faster from 2 MB folios (batch 8 1.03x), two copies of the same
    weights alternating in one process. Pages already cached stay as they are; where the kernel has
    no huge pages for files the advice is a no-op."""
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mapped.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel without transparent huge pages
            pass
    return mapped


class SafetensorsFile:
    """One safetensors file, memory-mapped; tensors share the mapping until written to."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header_len, header = read_header(self.path)
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        size = self.path.stat().st_size
        self.infos: dict[str, TensorInfo] = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: bad header entry for tensor '{name}'") from None
            info = TensorInfo(name, dtype, shape)
            if end - begin != info.nbytes or self.data_start + end > size:
                raise CheckpointError(f"{self.path}: tensor '{name}' is truncated or inconsistent")
            self.infos[name] = info
            self.offsets[name] = (begin, end)
        self._map: mmap.mmap | None = None
        self._released: list[tuple[int, int]] = []  # (first byte, length) of every release

    def _mapping(self) -> mmap.mmap:
        if self._map is None:
            self._map = map_weights(self.path)
        return self._map

    def keys(self) -> list[str]:
        return list(self.infos)

    def tensor(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        begin, _ = self.offsets[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        offset = self.data_start + begin
        if offset % dtype_size(info.dtype):
            # A misaligned tensor cannot be viewed in place; read it into its own memory.
            raw = bytearray(self._mapping()[offset : offset + info.nbytes])
            return torch.frombuffer(raw, dtype=info.dtype).reshape(info.shape)
        flat = torch.frombuffer(self._mapping(), dtype=info.dtype, count=info.numel, offset=offset)
        return flat.reshape(info.shape)

    def span(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        """Where `tensor` lies in this file's mapping (byte offsets), or None where it does not."""
        if self._map is None or tensor.numel() == 0:
            return None
        view = ctypes.c_char.from_buffer(self._map)
        start = tensor.data_ptr() - ctypes.addressof(view)
        del view  # an exported buffer would keep the mapping from ever closing
        end = start + tensor.numel() * tensor.element_size()
        return (start, end) if 0 <= start and end <= len(self._map) else None

    def release(self, tensor: torch.Tensor) -> bool:
        """Drop the pages under `tensor` (a contiguous view of this file's mapping) from this
        process's memory, once its values have been copied elsewhere (cast, packed). Nothing is
        lost: a later read faults them back in from the file. False if the tensor is not ours."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return False
        span = self.span(tensor)
        if span is None:
            return False
        start, end = span
        # Whole pages only: the partial pages at either end may hold a neighbour's bytes.
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)
            self._released.append((first, last - first))
        return True

    def release_again(self) -> None:
        """Drop the released tensors' pages once more, at the end of a load: reading a tensor maps
        the pages around the ones read (fault-around, and whole 2 MB folios of a file cached in
        huge pages), released neighbours among them. Gemma-2B int4 had 70 MiB of released pages
        back by the end of its load (its peak 1852 MiB without this, 1784 with)."""
        for first, length in self._released:
            self._map.madvise(mmap.MADV_DONTNEED, first, length)


class Checkpoint:
    """The weights of a standard folder (one file or shards with an index), or a single file."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if path.is_file():
            files = [path.name]
            root = path.parent
        elif (path / INDEX_NAME).is_file():
            root = path
            try:
                index = json.loads((path / INDEX_NAME).read_text())
                weight_map = index["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{path / INDEX_NAME}: not a valid safetensors index") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (root / f).is_file()]
            if missing:
                raise CheckpointError(f"{path}: shard {missing[0]} named in {INDEX_NAME} is missing")
        elif (path / SINGLE_NAME).is_file():
            root, files = path, [SINGLE_NAME]
        else:
            others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
            hint = f" (found {others[0]}: convert it with 'lmtool convert')" if others else ""
            raise CheckpointError(f"{path}: no model.safetensors or {INDEX_NAME}{hint}")
        for name in files:
            st = SafetensorsFile(root / name)
            self.files[name] = st
            for key in st.keys():
                if key in self.where:
                    raise CheckpointError(f"{root / name}: tensor '{key}' also appears in {self.where[key]}")
                self.where[key] = name

    def keys(self) -> list[str]:
        return list(self.where)

    def info(self, name: str) -> TensorInfo:
        return self.files[self.where[name]].infos[name]

    def tensor(self, name: str) -> torch.Tensor:
        return self.files[self.where[name]].tensor(name)

    def infos(self) -> list[TensorInfo]:
        return [self.info(k) for k in self.keys()]

    def release(self, tensor: torch.Tensor) -> None:
        """Drop a consumed tensor's pages from memory (see SafetensorsFile.release)."""
        any(f.release(tensor) for f in self.files.values())

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether tensor lies in one of this checkpoint's mappings (not a copy made from it)."""
        return any(f.span(tensor) is not None for f in self.files.values())

    def release_again(self) -> None:
        """Drop every released tensor's pages once more (see SafetensorsFile.release_again)."""
        for f in self.files.values():
            f.release_again()


# --- writing ---------------------------------------------------------------------------------


@dataclass
class PlannedTensor:
    """A tensor of an output checkpoint: its shape and dtype known up front, its data produced
    on demand (so a converter can stream)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = text.strip().upper()
    number = s.rstrip("KMGIB")
    unit = s[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise LmtoolError(f"cannot read size '{text}' (examples: 500MB, 5GB, 2GiB)") from None
    if value <= 0:
        raise LmtoolError(f"size must be positive, got '{text}'")
    return int(value)


def plan_shards(tensors: list[PlannedTensor], max_shard_size: int | None) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if max_shard_size and shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header(tensors: list[PlannedTensor], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    path: Path,
    tensors: list[PlannedTensor],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[PlannedTensor], None] | None = None,
) -> None:
    """Write tensors to one file, producing and releasing them one at a time."""
    with open(path, "wb") as f:
        f.write(_header(tensors, metadata or {"format": "pt"}))
        for t in tensors:
            data = t.produce()
            if tuple(data.shape) != tuple(t.shape):
                raise CheckpointError(f"{t.name}: produced shape {tuple(data.shape)}, planned {t.shape}")
            data = data.to(device="cpu", dtype=t.dtype).contiguous()
            if data.numel():
                f.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
            del data
            if on_tensor:
                on_tensor(t)


def write_weights(
    folder: Path,
    tensors: list[PlannedTensor],
    max_shard_size: int | None = None,
    on_tensor: Callable[[PlannedTensor], None] | None = None,
) -> list[str]:
    """Write tensors as model.safetensors or shards plus an index; returns the file names."""
    shards = plan_shards(tensors, max_shard_size)
    names = shard_names(len(shards))
    for name, shard in zip(names, shards):
        write_safetensors(folder / name, shard, on_tensor=on_tensor)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard},
        }
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


@contextmanager
def atomic_folder(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on any failure
    (an exception or Ctrl-C) it is removed and `out` is untouched."""
    out = Path(out)
    if out.exists() and not force:
        raise LmtoolError(f"{out}: already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
