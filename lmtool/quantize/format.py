"""The compressed-tensors layout: the tensors of a quantized module and config.json's
`quantization_config`, written as transformers + the `compressed-tensors` package (and vLLM) load
them, and read from lmtool's own output or llm-compressor's W8A16 / W4A16 checkpoints.

Per quantized module M (its float `M.weight` replaced by):
- 8 bits, symmetric ("naive-quantized", what lmtool writes): `M.weight` int8 [out, in] and
  `M.weight_scale` [out, 1]. The codes are stored as they are used, so loading maps them.
- "pack-quantized" (lmtool's int4; llm-compressor's W8A16 and W4A16): `M.weight_packed` int32
  [out, in * bits / 32], codes + 2^(bits-1) with element 0 in the lowest bits; `M.weight_scale`
  [out, groups]; `M.weight_shape` [2]; asymmetric: `M.weight_zero_point` int32, packed the same way
  along the *output* dimension [out * bits / 32, groups].
Dequantized: (codes - zero_point) * scale. The reader needs only the tensors: bits, group size and
symmetry follow from their shapes, so any config group layout (class targets, regexes, names) loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..checkpoint import Checkpoint, PlannedTensor
from ..errors import CheckpointError, UnsupportedError
from .schemes import Quantized, dequantize, pack_int32, unpack_int32

QUANT_METHOD = "compressed-tensors"
NAIVE = "naive-quantized"
PACKED = "pack-quantized"
# quant.c's ROW_BLOCK: the rows its x86 int4 kernel reads interleaved as one block.
ROW_BLOCK = 8
# Suffixes of a quantized module's tensors; the float weight's `.weight` (int8 in naive-quantized).
PARAM_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


def is_quantized_config(config: dict[str, Any]) -> bool:
    quant = config.get("quantization_config")
    return isinstance(quant, dict) and bool(quant)


def check_quantization_config(config: dict[str, Any], source: str) -> None:
    """Refuse quantization_configs lmtool cannot run, naming what they are."""
    quant = config["quantization_config"]
    method = quant.get("quant_method")
    if method != QUANT_METHOD:
        raise UnsupportedError(f"{source}: quantization method '{method}' is not supported (lmtool reads {QUANT_METHOD})")
    status = quant.get("quantization_status", "compressed")
    if status not in ("compressed", "frozen"):
        raise UnsupportedError(f"{source}: compressed-tensors checkpoint in state '{status}' (expected 'compressed')")
    for name, group in (quant.get("config_groups") or {}).items():
        weights = (group or {}).get("weights") or {}
        if weights.get("type", "int") != "int":
            raise UnsupportedError(f"{source}: config group '{name}' has {weights.get('type')} weights (lmtool reads int)")
        if (group or {}).get("input_activations"):
            raise UnsupportedError(f"{source}: config group '{name}' quantizes activations (lmtool reads weight-only)")


# --- writing --------------------------------------------------------------------------------------


def format_of(bits: int) -> str:
    return NAIVE if bits == 8 else PACKED


def planned_tensors(
    module: str,
    shape: tuple[int, int],
    bits: int,
    group_size: int | None,
    scale_dtype: torch.dtype,
    produce: Callable[[], Quantized],
) -> list[PlannedTensor]:
    """The output tensors of one quantized module, produced on demand: the first one written
    quantizes the weight, the others take their part of that result."""
    out_features, in_features = shape
    groups = 1 if group_size is None else in_features // group_size
    memo: dict[str, torch.Tensor] = {}

    def part(name: str) -> Callable[[], torch.Tensor]:
        def take() -> torch.Tensor:
            if not memo:
                memo.update(compressed_tensors(produce(), shape))
            return memo.pop(name)

        return take

    names_shapes: list[tuple[str, tuple[int, ...], torch.dtype]]
    if bits == 8:
        names_shapes = [("weight", shape, torch.int8), ("weight_scale", (out_features, 1), scale_dtype)]
    else:
        names_shapes = [
            ("weight_packed", (out_features, in_features * bits // 32), torch.int32),
            ("weight_scale", (out_features, groups), scale_dtype),
            ("weight_zero_point", (out_features * bits // 32, groups), torch.int32),
            ("weight_shape", (2,), torch.int64),
        ]
    return [PlannedTensor(f"{module}.{name}", s, dtype, part(name)) for name, s, dtype in names_shapes]


def compressed_tensors(q: Quantized, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    if q.bits == 8:
        return {"weight": q.codes, "weight_scale": q.scale.view(-1, 1)}
    return {
        "weight_packed": pack_int32(q.codes, q.bits),
        "weight_scale": q.scale,
        "weight_zero_point": pack_int32(q.zero_point, q.bits, dim=0),
        "weight_shape": torch.tensor(shape, dtype=torch.int64),
    }


def quantization_config(groups: dict[tuple[int, int | None], list[str]], version: str) -> dict[str, Any]:
    """config.json's quantization_config: one config group per (bits, group size), each naming its
    modules exactly (compressed-tensors matches targets by module name, class or 're:' regex)."""
    config_groups: dict[str, Any] = {}
    formats = set()
    for index, ((bits, group_size), modules) in enumerate(sorted(groups.items(), key=lambda kv: -kv[0][0])):
        fmt = format_of(bits)
        formats.add(fmt)
        config_groups[f"group_{index}"] = {
            "targets": sorted(modules),
            "weights": {
                "num_bits": bits,
                "type": "int",
                "symmetric": bits == 8,
                "strategy": "channel" if group_size is None else "group",
                "group_size": group_size,
                "dynamic": False,
                "actorder": None,
                "observer": "minmax",
            },
            "input_activations": None,
            "output_activations": None,
            "format": fmt,
        }
    return {
        "quant_method": QUANT_METHOD,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": [],
        "kv_cache_scheme": None,
        "version": version,
    }


# --- reading --------------------------------------------------------------------------------------


@dataclass
class QuantizedWeight:
    """A quantized module's weight as stored (memory-mapped): int8 codes [out, in] for 8 bits, or
    the packed bytes [out, in / 2] (byte j: element 2j in the low nibble, 2j+1 in the high one)
    for 4 bits; scale [out, groups]; zero point int8 [out, groups] or None."""

    name: str
    out_features: int
    in_features: int
    bits: int
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    codes: torch.Tensor | None = None  # 8 bits
    nibbles: torch.Tensor | None = None  # 4 bits
    # 4 bits on CPU where lmtool's own kernel cannot run: the codes in the layout of torch's int4
    # CPU kernel (made at load, see lmtool.quantize.linear.prepare), and its per-dtype
    # [groups, out, 2] scales and float zeros.
    int4pack: torch.Tensor | None = None
    _row_scales: dict = field(default_factory=dict, repr=False)
    _group_scale: torch.Tensor | None = field(default=None, repr=False)
    _native_answers: dict = field(default_factory=dict, repr=False)  # lmtool.quantize.linear.native_kernel's answers
    _scale_zeros: dict = field(default_factory=dict, repr=False)
    # The zero points as the checkpoint packs them (mapped), for stored(): packing them again at
    # every state_dict() (one at each load) left their temporaries on the heap.
    _stored_zero_point: torch.Tensor | None = field(default=None, repr=False)
    # How many leading rows are interleaved by blocks of ROW_BLOCK for lmtool's kernel
    # (lmtool.quantize.linear.interleave, at load): 4 bits' nibbles, scale and zero_point, 8 bits'
    # codes (their scale is one per row); 0: all as stored.
    interleaved: int = 0
    # What stored() gave before the interleaving: views of the mapping, whose pages were dropped
    # (a state_dict, as every load takes one, reads none of them; a save faults them back in).
    _stored_before: dict | None = field(default=None, repr=False)

    @property
    def groups(self) -> int:
        return self.scale.shape[1]

    @property
    def group_size(self) -> int:
        return self.in_features // self.groups

    @property
    def nbytes(self) -> int:
        stored = [self.codes, self.nibbles, self.scale, self.zero_point]
        return sum(t.numel() * t.element_size() for t in stored if t is not None)

    def row_scale(self, dtype: torch.dtype) -> torch.Tensor:
        """The per-row scale as a 1-D tensor of dtype (what int8 kernels take), made once."""
        cached = self._row_scales.get(dtype)
        if cached is None:
            cached = self._row_scales[dtype] = self.scale.reshape(-1).to(dtype).contiguous()
        return cached

    def group_scale(self) -> torch.Tensor:
        """The scale [out, groups] as lmtool's int4 kernel reads it, bfloat16 or float32 with unit
        stride along the groups: the stored (mapped) tensor itself where it is one, else a float32
        copy made once."""
        if self.scale.dtype in (torch.bfloat16, torch.float32) and self.scale.stride(1) == 1:
            return self.scale
        if self._group_scale is None:
            self._group_scale = self.scale.to(torch.float32).contiguous()
        return self._group_scale

    def scale_and_zeros(self, dtype: torch.dtype) -> torch.Tensor:
        """[groups, out, 2]: scale and the float zero of (u - 8) * scale + zero, u the stored
        nibble (zero = -zero_point * scale), as torch's int4 kernel takes them; made once."""
        cached = self._scale_zeros.get(dtype)
        if cached is None:
            scale = self.scale.to(torch.float32)
            zero = torch.zeros_like(scale) if self.zero_point is None else -self.zero_point.to(torch.float32) * scale
            cached = torch.stack((scale.T, zero.T), dim=-1).to(dtype).contiguous()
            self._scale_zeros[dtype] = cached
        return cached

    def stored(self) -> dict[str, torch.Tensor]:
        """The module's tensors in the compressed-tensors layout (views, nothing dequantized)."""
        if self._stored_before is not None:
            return dict(self._stored_before)
        if self.bits == 8:
            return {"weight": self.codes, "weight_scale": self.scale}
        tensors = {"weight_packed": self.nibbles.view(torch.int32), "weight_scale": self.scale,
                   "weight_shape": torch.tensor([self.out_features, self.in_features])}
        if self.zero_point is not None:
            stored = self._stored_zero_point
            tensors["weight_zero_point"] = stored if stored is not None else pack_int32(self.zero_point, 4, dim=0)
        return tensors

    def in_row_order(self, tensor: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
        """rows of codes, nibbles, scale or zero_point as stored, undoing the interleaving (blocks of
        ROW_BLOCK rows, each [units][ROW_BLOCK], a unit 4 bytes of codes or nibbles or one scale;
        zero points packed, packed_zero_bytes) where there is one: 8 bits interleave their codes
        only."""
        if not self.interleaved or (self.bits == 8 and tensor is not self.codes):
            return tensor[rows]
        # row indices as given (an embedding's lookups: no arange over a 256000-row vocabulary per token)
        if isinstance(rows, torch.Tensor):
            index = torch.where(rows < 0, rows + self.out_features, rows).reshape(-1)
        else:
            index = torch.arange(self.out_features)[rows]
        width = tensor.shape[1]
        if tensor is self.zero_point:
            return self._zero_points_in_row_order(index)
        unit = 4 if tensor is self.nibbles or tensor is self.codes else 1
        blocks = tensor[: self.interleaved].view(-1, width // unit, ROW_BLOCK, unit)
        out = tensor.new_empty(index.numel(), width)
        inside = index < self.interleaved
        out[inside] = blocks[index[inside] // ROW_BLOCK, :, index[inside] % ROW_BLOCK].reshape(-1, width)
        out[~inside] = tensor[index[~inside]]
        return out

    def zero_points_at(self, row: int | torch.Tensor) -> int | torch.Tensor:
        """The offset in bytes of row's zero points in zero_point (row: the first of a block where
        it is interleaved): the interleaved rows' packed ones first (packed_zero_bytes), then the
        rows after them as stored, one int8 per group."""
        groups = self.zero_point.shape[1]
        if isinstance(row, int) and row <= self.interleaved:
            return packed_zero_bytes(row, groups)
        return packed_zero_bytes(self.interleaved, groups) + (row - self.interleaved) * groups

    def _zero_points_in_row_order(self, index: torch.Tensor) -> torch.Tensor:
        """The int8 zero points of rows `index` of an interleaved weight (zero_points_at)."""
        groups, flat = self.zero_point.shape[1], self.zero_point.view(-1)
        group = torch.arange(groups)
        out = self.zero_point.new_empty(index.numel(), groups)
        inside = index < self.interleaved
        row = index[inside][:, None]
        byte = packed_zero_bytes(row - row % ROW_BLOCK, groups) + group * (ROW_BLOCK // 2) + row % ROW_BLOCK // 2
        out[inside] = ((flat[byte].to(torch.int16) & 0xFF) >> (row % 2 * 4) & 15).to(torch.int8) - 8
        out[~inside] = flat[self.zero_points_at(index[~inside][:, None]) + group]
        return out

    def to(self, device: torch.device) -> "QuantizedWeight":
        if device.type == "cpu":
            return self
        assert not self.interleaved, "rows are interleaved at load, for the CPU kernel only"
        moved = {name: getattr(self, name) for name in ("scale", "zero_point", "codes", "nibbles")}
        moved = {name: None if t is None else t.to(device) for name, t in moved.items()}
        return QuantizedWeight(self.name, self.out_features, self.in_features, self.bits, **moved)

    def dequantize_rows(self, rows: slice | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The float rows (a slice, or row indices) of the weight."""
        if self.bits == 8:
            codes = self.in_row_order(self.codes, rows)
        else:
            packed = self.in_row_order(self.nibbles, rows)
            codes = torch.stack((packed & 15, packed >> 4), dim=-1).view(packed.shape[0], -1).view(torch.int8) - 8
        zero_point = None if self.zero_point is None else self.in_row_order(self.zero_point, rows)
        return dequantize(codes, self.in_row_order(self.scale, rows), zero_point, dtype)


def packed_zero_bytes(rows: int, groups: int) -> int:
    """The bytes of the zero points of `rows` interleaved rows, packed as quant.c's PACKED_ZEROS: per
    block of ROW_BLOCK rows and group, 8 + zero point in a nibble each, row r in nibble r (the low
    one first); the rows after the interleaved ones follow as stored, an int8 per group."""
    return rows // ROW_BLOCK * groups * (ROW_BLOCK // 2)


def quantized_modules(checkpoint: Checkpoint) -> list[str]:
    """The checkpoint's quantized modules (names as in the checkpoint): those with a weight_scale."""
    return [key[: -len(".weight_scale")] for key in checkpoint.keys() if key.endswith(".weight_scale")]


def read_weight(checkpoint: Checkpoint, module: str, source: str) -> tuple[QuantizedWeight, list[str]]:
    """A quantized module's weight and the checkpoint keys it used."""
    def has(suffix: str) -> bool:
        return f"{module}.{suffix}" in checkpoint.where

    def get(suffix: str) -> torch.Tensor:
        return checkpoint.tensor(f"{module}.{suffix}")

    if has("weight_g_idx"):
        raise UnsupportedError(f"{source}: '{module}' uses activation ordering (weight_g_idx), which lmtool does not read")
    used = [f"{module}.weight_scale"]
    scale = get("weight_scale")
    if scale.dim() < 2:
        scale = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(1, 1)
    if has("weight_packed"):
        packed = get("weight_packed")
        used.append(f"{module}.weight_packed")
        if not has("weight_shape"):
            raise CheckpointError(f"{source}: '{module}.weight_packed' has no weight_shape")
        out_features, in_features = (int(v) for v in get("weight_shape").tolist())
        used.append(f"{module}.weight_shape")
        if packed.dtype != torch.int32 or packed.shape[0] != out_features:
            raise CheckpointError(f"{source}: '{module}.weight_packed' is not int32 [{out_features}, ...]")
        bits = 32 * packed.shape[1] // in_features if in_features else 0
        if bits not in (4, 8) or packed.shape[1] * 32 != bits * in_features:
            raise UnsupportedError(f"{source}: '{module}' packs {packed.shape[1]} words for {in_features} inputs (lmtool reads 4 and 8 bits)")
        raw = packed.view(torch.uint8)  # little-endian words: element 0 in the first byte
        if bits == 8:
            # Offset-binary bytes (q + 128) to two's complement: flip the top bit (one copy, at load).
            weight = QuantizedWeight(module, out_features, in_features, 8, scale, None,
                                     codes=(raw ^ 0x80).view(torch.int8))
            checkpoint.release(packed)
        else:
            weight = QuantizedWeight(module, out_features, in_features, 4, scale, None, nibbles=raw)
    else:
        codes = get("weight")
        used.append(f"{module}.weight")
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise CheckpointError(f"{source}: '{module}.weight' has a weight_scale but is not int8 [out, in]")
        weight = QuantizedWeight(module, codes.shape[0], codes.shape[1], 8, scale, None, codes=codes)
    if weight.scale.shape[0] == 1 and weight.out_features > 1:
        weight.scale = weight.scale.expand(weight.out_features, -1)  # one scale per tensor
    if weight.scale.shape[0] != weight.out_features or weight.in_features % weight.scale.shape[1]:
        raise CheckpointError(f"{source}: '{module}.weight_scale' has shape {list(scale.shape)} for a "
                              f"[{weight.out_features}, {weight.in_features}] weight")
    if has("weight_zero_point"):
        zero = get("weight_zero_point")
        used.append(f"{module}.weight_zero_point")
        if zero.dtype == torch.int32 and zero.shape[0] != weight.out_features:
            weight._stored_zero_point = zero
            zero = unpack_int32(zero, weight.bits, weight.out_features, dim=0)
        weight.zero_point = zero.to(torch.int8).reshape(weight.out_features, -1)
        if not weight.zero_point.any():
            weight.zero_point = None  # symmetric after all
    return weight, used


def describe(config: dict[str, Any], infos: list) -> dict[str, Any]:
    """What `lmtool inspect` shows of a quantized checkpoint, from config.json and the tensor
    headers alone: method, format, scheme, bits per quantized weight (scales and zero points
    included), and tensors and bytes per precision group."""
    by_name = {i.name: i for i in infos}
    groups: dict[str, dict[str, int]] = {}
    quantized_bits = quantized_weights = 0
    seen: set[str] = set()
    for info in infos:
        if not info.name.endswith(".weight_scale"):
            continue
        module = info.name[: -len(".weight_scale")]
        parts = [by_name[f"{module}.{s}"] for s in ("weight", *PARAM_SUFFIXES) if f"{module}.{s}" in by_name]
        seen.update(p.name for p in parts)
        packed = by_name.get(f"{module}.weight_packed")
        stored = by_name.get(f"{module}.weight")
        out_features = info.shape[0]
        if packed is not None:
            bits = _packed_bits(module, out_features, by_name, config.get("quantization_config") or {})
            in_features = packed.shape[1] * 32 // bits
        elif stored is not None:
            in_features, bits = stored.shape[1], 8
        else:
            continue
        columns = info.shape[1] if len(info.shape) == 2 else 1
        grouped = columns > 1 or _weights_of(module, bits, config).get("strategy") == "group"
        label = f"int{bits} g{in_features // columns}" if grouped else f"int{bits} per row"
        entry = groups.setdefault(label, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += sum(p.nbytes for p in parts)
        quantized_bits += 8 * sum(p.nbytes for p in parts if not p.name.endswith("weight_shape"))
        quantized_weights += out_features * in_features
    rest = [i for i in infos if i.name not in seen]
    groups["unquantized"] = {"tensors": len(rest), "bytes": sum(i.nbytes for i in rest)}
    # The model's parameter count (a packed int32 holds several weights; scales are not weights).
    parameters = quantized_weights + sum(i.numel for i in rest)
    quant = config.get("quantization_config") or {}
    recipe = (config.get("lmtool_quantization") or {}).get("recipe") or {}
    labels = [g for g in groups if g != "unquantized"]
    scheme = recipe.get("scheme") or (labels[0].split()[0] if len(labels) == 1 else "mixed")
    return {
        "method": quant.get("quant_method"),
        "format": quant.get("format"),
        "scheme": scheme,
        "bits_per_weight": round(quantized_bits / quantized_weights, 3) if quantized_weights else None,
        "parameters": parameters,
        "groups": groups,
    }


def _packed_bits(module: str, out_features: int, by_name: dict, quant: dict[str, Any]) -> int:
    """Bits per code of a pack-quantized module, from headers: a packed zero point's rows, else
    the config group naming the module, else the first pack-quantized group."""
    zero = by_name.get(f"{module}.weight_zero_point")
    if zero is not None and zero.shape[0] != out_features:
        return round(32 * zero.shape[0] / out_features)
    groups = [g for g in (quant.get("config_groups") or {}).values() if isinstance(g, dict)]
    for group in groups:
        if module in (group.get("targets") or []):
            return int(group["weights"]["num_bits"])
    packed = [g for g in groups if g.get("format", quant.get("format")) == PACKED]
    return int(packed[0]["weights"]["num_bits"]) if packed else 4


def _weights_of(module: str, bits: int, config: dict[str, Any]) -> dict[str, Any]:
    """The `weights` of the config group naming the module, else of the first with these bits."""
    groups = [g for g in ((config.get("quantization_config") or {}).get("config_groups") or {}).values()
              if isinstance(g, dict) and isinstance(g.get("weights"), dict)]
    named = [g for g in groups if module in (g.get("targets") or [])]
    same_bits = [g for g in groups if g["weights"].get("num_bits") == bits]
    chosen = named or same_bits
    return chosen[0]["weights"] if chosen else {}
