"""Flax `flax_model.msgpack` checkpoints, read without jax or flax (msgpack: `pip install 'lmtool[flax]'`).

flax.serialization writes the params tree as one msgpack map. Each array is an ExtType (code 1)
whose payload is itself msgpack: (shape, dtype name, C-order bytes). Arrays over 1 GiB are split
into a `{"__msgpack_chunked_array__": True, "shape": {...}, "chunks": {...}}` map of flat pieces.

The decoder walks the file through a memory map with the msgpack package, one small value at a
time, and records where each array's bytes are instead of copying them, so reading the tree costs almost nothing and each tensor is read only
when a conversion writes it. The naming rules turn Flax parameter paths into transformers' PyTorch
names (kernels transposed), and `FlaxConverter` is the `lmtool convert` route that families share.
"""

from __future__ import annotations

import json
import math
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import PlannedTensor
from .errors import CheckpointError, ConfigError, UnsupportedError

MSGPACK_NAME = "flax_model.msgpack"
INDEX_NAME = "flax_model.msgpack.index.json"
CHUNKED = "__msgpack_chunked_array__"

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


# --- decoding ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Span:
    """Bytes of a msgpack bin value, left in the file."""

    offset: int
    length: int


@dataclass
class FlaxArray:
    """An array of the file: its shape and dtype, and the spans that hold its bytes in order."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    spans: list[_Span]
    source: mmap.mmap | bytes

    @property
    def nbytes(self) -> int:
        return sum(s.length for s in self.spans)

    def load(self) -> torch.Tensor:
        raw = bytearray()
        for s in self.spans:
            raw += self.source[s.offset : s.offset + s.length]
        if not raw:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.frombuffer(raw, dtype=self.dtype).reshape(self.shape)


# Where a msgpack value holds something other than a plain value: ext types carry a type code and
# a payload (fixext 1..16 bytes, or ext 8/16/32 with a length of that many bits); bin is raw bytes.
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
_EXT_LENGTH = {0xC7: 1, 0xC8: 2, 0xC9: 4}
_BIN_LENGTH = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_MAPS = {*range(0x80, 0x90), 0xDE, 0xDF}
_LISTS = {*range(0x90, 0xA0), 0xDC, 0xDD}
_WINDOW = 4096  # bytes handed to msgpack at a time: a map header, a key, a small value


class _Decoder:
    """Walks a msgpack buffer with the msgpack package, one small value at a time: maps and lists
    are followed, ext types 1 and 3 (flax's arrays and scalars) become FlaxArray with the place of
    their bytes in the buffer, so no array is copied (or even read) while the tree is decoded."""

    def __init__(self, buf: mmap.mmap | bytes, source: str):
        self.buf, self.source = buf, source

    def _byte(self, pos: int) -> int:
        if pos >= len(self.buf):
            raise CheckpointError(f"{self.source}: truncated msgpack data at byte {pos}")
        return self.buf[pos]

    def _unpacker(self, pos: int, size: int = _WINDOW):
        import msgpack

        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=2**31 - 1)
        unpacker.feed(self.buf[pos : pos + size])
        return unpacker

    def _read(self, pos: int, what: str) -> tuple[Any, int]:
        """One plain value (or a map or list header, what = 'map'/'list') at pos, and where it ends."""
        import msgpack

        size = _WINDOW
        while True:
            unpacker = self._unpacker(pos, size)
            try:
                if what == "map":
                    value = unpacker.read_map_header()
                elif what == "list":
                    value = unpacker.read_array_header()
                else:
                    value = unpacker.unpack()
                return value, pos + unpacker.tell()
            except msgpack.OutOfData:
                if pos + size >= len(self.buf):
                    raise CheckpointError(f"{self.source}: truncated msgpack data at byte {pos}") from None
                size *= 16  # a long string or bin: give msgpack more of the buffer
            except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
                raise CheckpointError(f"{self.source}: invalid msgpack data at byte {pos} ({exc})") from None

    def _ext(self, pos: int) -> tuple[int, int, int] | None:
        """(type code, payload offset, payload length) when an ext value starts at pos."""
        first = self._byte(pos)
        if first in _FIXEXT:
            length, header = _FIXEXT[first], 1
        elif first in _EXT_LENGTH:
            width = _EXT_LENGTH[first]
            length, header = int.from_bytes(self.buf[pos + 1 : pos + 1 + width], "big"), 1 + width
        else:
            return None
        code = int.from_bytes(bytes([self._byte(pos + header)]), "big", signed=True)
        start = pos + header + 1
        if start + length > len(self.buf):
            raise CheckpointError(f"{self.source}: truncated msgpack data at byte {pos}")
        return code, start, length

    def value(self, pos: int) -> tuple[Any, int]:
        """The value at pos and where it ends."""
        ext = self._ext(pos)
        if ext is not None:
            code, start, length = ext
            if code not in (1, 3):  # 2 = complex; not a parameter, kept opaque
                return ("ext", code, _Span(start, length)), start + length
            return self._array(start, length), start + length
        first = self._byte(pos)
        if first in _MAPS:
            count, pos = self._read(pos, "map")
            out = {}
            for _ in range(count):
                key, pos = self.value(pos)
                out[tuple(key) if isinstance(key, list) else key], pos = self.value(pos)
            return out, pos
        if first in _LISTS:
            count, pos = self._read(pos, "list")
            items = []
            for _ in range(count):
                item, pos = self.value(pos)
                items.append(item)
            return items, pos
        return self._read(pos, "value")

    def _array(self, start: int, length: int) -> FlaxArray:
        """flax's array payload: msgpack of (shape, dtype name, C-order bytes as bin)."""
        bad = CheckpointError(f"{self.source}: unsupported array encoding at byte {start}")
        if self._byte(start) not in _LISTS:
            raise bad
        count, pos = self._read(start, "list")
        if count != 3:
            raise bad
        shape, pos = self.value(pos)
        dtype_name, pos = self.value(pos)
        try:
            shape = tuple(int(d) for d in shape)
            dtype = DTYPES[dtype_name]
        except (TypeError, ValueError, KeyError):
            raise bad from None
        width = _BIN_LENGTH.get(self._byte(pos))
        if width is None:
            raise bad
        size = int.from_bytes(self.buf[pos + 1 : pos + 1 + width], "big")
        data = _Span(pos + 1 + width, size)
        if data.offset + size != start + length or size != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{self.source}: array at byte {start} has the wrong number of bytes")
        return FlaxArray(shape, dtype, [data], self.buf)


def decode(buf: mmap.mmap | bytes, source: str = "msgpack") -> Any:
    """Decode one msgpack value. Arrays are FlaxArray whose bytes stay in `buf`."""
    value, end = _Decoder(buf, source).value(0)
    if end != len(buf):
        raise CheckpointError(f"{source}: {len(buf) - end} bytes of trailing data after the msgpack value")
    return value


def _unchunk(node: dict, where: str) -> FlaxArray:
    try:
        shape = tuple(int(node["shape"][str(i)]) for i in range(len(node["shape"])))
        chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{where}: malformed chunked array") from None
    if not chunks or not all(isinstance(c, FlaxArray) and c.dtype == chunks[0].dtype for c in chunks):
        raise CheckpointError(f"{where}: malformed chunked array")
    array = FlaxArray(shape, chunks[0].dtype, [s for c in chunks for s in c.spans], chunks[0].source)
    if array.nbytes != math.prod(shape) * array.dtype.itemsize:
        raise CheckpointError(f"{where}: chunked array does not fill its shape {list(shape)}")
    return array


def flatten(tree: Any, source: str, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], FlaxArray]:
    """Nested params dict -> {path tuple: FlaxArray}; chunked arrays are joined."""
    if isinstance(tree, FlaxArray):
        return {prefix: tree}
    if not isinstance(tree, dict):
        raise CheckpointError(f"{source}: '{'/'.join(prefix)}' is not an array or a dict of arrays")
    if CHUNKED in tree:
        return {prefix: _unchunk(tree, f"{source}: '{'/'.join(prefix)}'")}
    out: dict[tuple[str, ...], FlaxArray] = {}
    for key, value in tree.items():
        out.update(flatten(value, source, prefix + (str(key),)))
    return out


FLAX_INSTALL = "pip install 'lmtool[flax]'"


def read_msgpack(path: Path) -> dict[tuple[str, ...], FlaxArray]:
    """The arrays of one msgpack file, by path. The file stays mapped while arrays refer to it."""
    try:
        import msgpack  # noqa: F401
    except ImportError:
        raise UnsupportedError(f"{path}: reading Flax checkpoints needs the msgpack package ({FLAX_INSTALL})") from None
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else b""
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    if not buf:
        raise CheckpointError(f"{path}: empty file")
    tree = decode(buf, str(path))
    if isinstance(tree, dict) and set(tree) == {"params"}:
        tree = tree["params"]
    return flatten(tree, str(path))


def read_flax_checkpoint(src: Path) -> tuple[dict[tuple[str, ...], FlaxArray], Path]:
    """The arrays of `src` (a flax_model.msgpack, or a folder with it or with sharded files and
    their index), and the folder the checkpoint lives in."""
    folder = src.parent if src.is_file() else src
    if src.is_file() or (folder / MSGPACK_NAME).is_file():
        path = src if src.is_file() else folder / MSGPACK_NAME
        return read_msgpack(path), folder
    index = folder / INDEX_NAME
    if not index.is_file():
        raise CheckpointError(f"{src}: no {MSGPACK_NAME} or {INDEX_NAME}")
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{index}: not a valid Flax shard index") from None
    arrays: dict[tuple[str, ...], FlaxArray] = {}
    for name in files:
        for key, array in read_msgpack(folder / name).items():
            if key in arrays:
                raise CheckpointError(f"{folder / name}: '{'/'.join(key)}' also appears in another shard")
            arrays[key] = array
    return arrays, folder


def has_flax_checkpoint(src: Path) -> bool:
    if src.is_file():
        return src.name.endswith(".msgpack")
    return (src / MSGPACK_NAME).is_file() or (src / INDEX_NAME).is_file()


# --- naming ------------------------------------------------------------------------------------


def _transpose_kernel(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 2:
        return t.T
    if t.dim() == 4:  # convolution kernels (H, W, in, out) -> (out, in, H, W)
        return t.permute(3, 2, 0, 1)
    return t


def torch_name(path: tuple[str, ...]) -> tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]:
    """Flax path -> (PyTorch name, transform): `kernel` becomes a transposed `weight`; `scale`
    and `embedding` become `weight`; everything else keeps its name."""
    *modules, leaf = path
    if leaf == "kernel":
        return ".".join([*modules, "weight"]), _transpose_kernel
    if leaf in ("scale", "embedding"):
        return ".".join([*modules, "weight"]), None
    return ".".join(path), None


def torch_shape(shape: tuple[int, ...], transform) -> tuple[int, ...]:
    if transform is None or len(shape) not in (2, 4):
        return shape
    return tuple(shape[::-1]) if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])


def planned_tensors(arrays: dict[tuple[str, ...], FlaxArray], backbone_prefix: str) -> list[PlannedTensor]:
    """One planned tensor per Flax array, under transformers' names. A base-model tree (no
    top-level backbone prefix, e.g. FlaxBloomModel) gets the prefix added."""
    base_model = not any(path[0] == backbone_prefix for path in arrays)
    tensors = []
    for path, array in arrays.items():
        name, transform = torch_name(path)
        if base_model:
            name = f"{backbone_prefix}.{name}"

        def produce(array=array, transform=transform) -> torch.Tensor:
            t = array.load()
            return transform(t) if transform else t

        tensors.append(PlannedTensor(name, torch_shape(array.shape, transform), array.dtype, produce))
    return tensors


# --- the converter -----------------------------------------------------------------------------


def _read_config(folder: Path, options) -> tuple[dict[str, Any], str]:
    """config.json beside the weights, updated by --config; and the name of its source."""
    data: dict[str, Any] = {}
    sources = []
    path = folder / "config.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        sources.append(str(path))
    overrides = options.config_overrides()
    if overrides:
        data.update(overrides)
        sources.append(str(options.config_file))
    if not sources:
        raise ConfigError(f"{folder}: no config.json beside the Flax weights; pass one with --config")
    return data, " + ".join(sources)


def check_against_model(family, config, tensors: list[PlannedTensor], source: str) -> None:
    """Raise CheckpointError unless the tensors are exactly what the config's causal LM expects."""
    from .loading import build_model

    model = build_model(family, config, "causal-lm", meta=True)
    expected = {k: tuple(v.shape) for k, v in model.checkpoint_state_dict().items()}
    got = {t.name: tuple(t.shape) for t in tensors}
    for name in got:
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor '{name}' for a {family.class_prefix} model")
    for name, shape in expected.items():
        if name not in got:
            raise CheckpointError(f"{source}: missing tensor '{name}'")
        if got[name] != shape:
            raise CheckpointError(
                f"{source}: tensor '{name}' has shape {list(got[name])}, the config implies {list(shape)}"
            )


@dataclass
class FlaxConverter:
    """`lmtool convert` from a transformers Flax checkpoint of one family (Flax<Family>Model or
    Flax<Family>ForCausalLM). The output is the family's causal LM in the standard layout."""

    name: str
    model_type: str
    # Top-level tree keys that identify the family when there is no config.json to read.
    signature: tuple[str, ...]

    @property
    def description(self) -> str:
        return f"transformers Flax checkpoint ({MSGPACK_NAME}) of a {self.model_type} model"

    def detect(self, src: Path) -> bool:
        if not has_flax_checkpoint(src):
            return False
        folder = src.parent if src.is_file() else src
        config = folder / "config.json"
        if config.is_file():
            try:
                return json.loads(config.read_text(encoding="utf-8")).get("model_type") == self.model_type
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                return False
        try:
            arrays, _ = read_flax_checkpoint(src)
        except CheckpointError:
            return False
        return any(path[0] in self.signature for path in arrays)

    def plan(self, src: Path, options):
        from .convert import ConversionPlan, side_files, tokenizer_files
        from .registry import get_family

        family = get_family(self.model_type)
        arrays, folder = read_flax_checkpoint(src)
        data, config_source = _read_config(folder, options)
        data.setdefault("model_type", self.model_type)
        if data["model_type"] != self.model_type:
            raise ConfigError(f"{config_source}: model_type '{data['model_type']}' is not {self.model_type}")
        config = family.config_class.from_dict(data, source=config_source)
        config.architectures = [family.architecture("causal-lm")]
        tensors = planned_tensors(arrays, family.backbone_prefix)
        check_against_model(family, config, tensors, str(src))
        # --tokenizer replaces the folder's tokenizer files; tokenizer_files(None) is none.
        files = {**side_files(folder, with_tokenizer=options.tokenizer is None),
                 **tokenizer_files(options.tokenizer, family)}
        return ConversionPlan(family, config, tensors, self.name, files)
