"""RecurrentGemma (Griffin) original checkpoints -> the standard layout (see lmtool.convert).

recurrentgemma-pytorch: the authors' `{variant}.pt` (e.g. `2b.pt`), a bare state dict of their
    torch Griffin: `embedder.input_embedding`, `blocks.N.{recurrent_block,attention_block,mlp_block}...`,
    `final_norm.scale`. Renamed to transformers' RecurrentGemmaForCausalLM names; the conv weight
    (K, L) becomes (L, 1, K) (same tap order), the fused `ffw_up` (2, D, E) splits into gate and up.
recurrentgemma-orbax: the Flax release, an orbax folder saved as `{'params': ...}` with top keys
    `embedder`, `blocks.0`, ..., `final_norm`. The names are the torch ones except that Dense layers
    hold `kernel` (in, out) where torch has `weight` (out, in); arrays are read one at a time.

The tensors tell the sizes, the block pattern, the head count (the RG-LRU gates have one block per
head), the key/value heads and the conv width. The attention window and the logits soft cap are in
no tensor: they come from --config, else from a released size whose shapes match, else from the
defaults (2048, 30.0), with a note. lm_head is tied to the embedding and is not written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ...checkpoint import PlannedTensor
from ...convert import ConversionPlan, ConvertOptions, find_tokenizer
from ...errors import CheckpointError, ConfigError
from ...original_formats import ORBAX_INSTALL, OrbaxArrays, load_state_dict, orbax_metadata_text, pickle_text
from .config import RecurrentGemmaConfig

BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.([^.]+)\.")
DEFAULT_PATTERN = ("recurrent", "recurrent", "attention")
TEMPORAL = {"recurrent": "recurrent_block", "attention": "attention_block"}
# What the weights cannot tell, and what it is when neither --config nor a released size says.
UNSEEN_DEFAULTS = {"attention_window_size": 2048, "logits_soft_cap": 30.0}


def _family():
    from . import FAMILY  # not at import time: FAMILY is built from this module's converters

    return FAMILY


# --- sources: the authors' torch names, whatever the file -------------------------------------------


class TorchSource:
    """The tensors of the authors' `.pt` (a bare state dict, memory-mapped)."""

    def __init__(self, path: Path):
        self.path = path
        self.name = str(path)
        self.tensors = load_state_dict(path)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key]


class OrbaxSource:
    """The arrays of the authors' orbax folder under their torch names: `blocks.0/recurrent_block/
    linear_x/kernel` (in, out) is `blocks.0.recurrent_block.linear_x.weight` (out, in)."""

    def __init__(self, src: Path):
        self.arrays = OrbaxArrays(src)
        self.root = self.arrays.root
        self.name = str(self.root)
        # torch name -> (array name, transposed)
        self.names: dict[str, tuple[str, bool]] = {}
        for array in self.arrays.arrays:
            parts = array.split("/")
            kernel = parts[-1] == "kernel"
            if kernel:
                parts[-1] = "weight"
            self.names[".".join(parts)] = (array, kernel)

    def keys(self) -> list[str]:
        return list(self.names)

    def shape(self, key: str) -> tuple[int, ...]:
        array, transposed = self.names[key]
        shape = self.arrays.shape(array)
        return shape[::-1] if transposed else shape

    def dtype(self, key: str) -> torch.dtype:
        return self.arrays.dtype(self.names[key][0])

    def get(self, key: str) -> torch.Tensor:
        array, transposed = self.names[key]
        value = self.arrays.array(array)  # the last one read is kept: gate and up share ffw_up
        return value.T if transposed else value


# --- what the tensors say -----------------------------------------------------------------------------


@dataclass
class Layout:
    embedding_rows: int
    hidden_size: int
    mlp_width: int  # E: transformers' intermediate_size is 2 * E
    layer_types: list[str]
    lru_width: int | None = None  # these four only when there is a recurrent block
    num_attention_heads: int | None = None
    conv1d_width: int | None = None
    kv_width: int | None = None  # key/value heads * head_dim, when there is an attention block


class Reader:
    """Checks a source's names and shapes and plans the output tensors."""

    def __init__(self, source: Any):
        self.source = source
        self.keys = set(source.keys())

    def _shape(self, key: str) -> tuple[int, ...]:
        if key not in self.keys:
            raise CheckpointError(f"{self.source.name}: no tensor '{key}'; is this a RecurrentGemma checkpoint?")
        return self.source.shape(key)

    def layout(self) -> Layout:
        embedding = self._shape("embedder.input_embedding")
        if len(embedding) != 2:
            raise CheckpointError(
                f"{self.source.name}: 'embedder.input_embedding' has shape {embedding}, expected (vocab, width)"
            )
        modules: dict[int, set[str]] = {}  # block number -> its modules (recurrent_block, mlp_block, ...)
        for key in self.keys:
            if m := BLOCK_KEY.match(key):
                modules.setdefault(int(m.group(1)), set()).add(m.group(2))
        blocks = sorted(modules)
        if not blocks or blocks != list(range(len(blocks))):
            raise CheckpointError(f"{self.source.name}: blocks are missing or misnumbered ({blocks})")
        kinds = []
        for i in blocks:
            found = [kind for kind, module in TEMPORAL.items() if module in modules[i]]
            if len(found) != 1:
                what = "both a recurrent_block and an attention_block" if found else "no recurrent_block or attention_block"
                raise CheckpointError(f"{self.source.name}: block {i} has {what}")
            kinds.append(found[0])
        layout = Layout(
            embedding_rows=embedding[0],
            hidden_size=embedding[1],
            mlp_width=self._shape("blocks.0.mlp_block.ffw_up.w")[-1],
            layer_types=kinds,
        )
        if "recurrent" in kinds:
            block = f"blocks.{kinds.index('recurrent')}.recurrent_block."
            layout.lru_width = self._shape(block + "linear_x.weight")[0]
            layout.num_attention_heads = self._shape(block + "rg_lru.input_gate.w")[0]
            layout.conv1d_width = self._shape(block + "conv_1d.w")[0]
        if "attention" in kinds:
            layout.kv_width = self._shape(f"blocks.{kinds.index('attention')}.attention_block.proj_k.weight")[0]
        return layout

    # --- the output tensors ---

    def planned(self, config: RecurrentGemmaConfig) -> list[PlannedTensor]:
        D, V, E = config.hidden_size, config.vocab_size, config.mlp_width
        L, K, nh = config.recurrent_width, config.conv1d_width, config.num_attention_heads
        kv, bw = config.kv_heads * config.head_dim, config.recurrent_width // config.num_attention_heads
        plan: list[tuple[str, str, tuple[int, ...], tuple[int, ...], Callable | None]] = []

        def add(out: str, key: str, source_shape: tuple[int, ...], out_shape: tuple[int, ...] | None = None,
                transform: Callable | None = None) -> None:
            plan.append((out, key, source_shape, out_shape or source_shape, transform))

        rows = self._shape("embedder.input_embedding")[0]
        add("model.embed_tokens.weight", "embedder.input_embedding", (rows, D), (V, D),
            (lambda w: w[:V]) if V < rows else None)
        for i, kind in enumerate(config.layer_types):
            src, out = f"blocks.{i}.", f"model.layers.{i}."
            add(out + "temporal_pre_norm.weight", src + "temporal_pre_norm.scale", (D,))
            t = out + "temporal_block."
            if kind == "recurrent":
                r = src + "recurrent_block."
                for name, shape in (("linear_x", (L, D)), ("linear_y", (L, D)), ("linear_out", (D, L))):
                    add(t + name + ".weight", r + name + ".weight", shape)
                    add(t + name + ".bias", r + name + ".bias", shape[:1])
                # (K, L) -> (L, 1, K): both apply w[K-1-s] to x[t-s], so no flip.
                add(t + "conv_1d.weight", r + "conv_1d.w", (K, L), (L, 1, K), lambda w: w.T[:, None, :])
                add(t + "conv_1d.bias", r + "conv_1d.b", (L,))
                add(t + "rg_lru.recurrent_param", r + "rg_lru.a_param", (L,))
                for ours, theirs in (("input_gate", "input_gate"), ("recurrent_gate", "a_gate")):
                    add(t + f"rg_lru.{ours}_weight", r + f"rg_lru.{theirs}.w", (nh, bw, bw))
                    add(t + f"rg_lru.{ours}_bias", r + f"rg_lru.{theirs}.b", (nh, bw))
            else:
                a = src + "attention_block."
                add(t + "q_proj.weight", a + "proj_q.weight", (D, D))
                add(t + "k_proj.weight", a + "proj_k.weight", (kv, D))
                add(t + "v_proj.weight", a + "proj_v.weight", (kv, D))
                add(t + "o_proj.weight", a + "proj_final.weight", (D, D))
                add(t + "o_proj.bias", a + "proj_final.bias", (D,))
            add(out + "channel_pre_norm.weight", src + "channel_pre_norm.scale", (D,))
            m, mlp = src + "mlp_block.", out + "mlp_block."
            # ffw_up (2, D, E) computes x @ w[c] (+ b[c]): c = 0 is the gate, 1 the up projection.
            add(mlp + "gate_proj.weight", m + "ffw_up.w", (2, D, E), (E, D), lambda w: w[0].T)
            add(mlp + "up_proj.weight", m + "ffw_up.w", (2, D, E), (E, D), lambda w: w[1].T)
            add(mlp + "gate_proj.bias", m + "ffw_up.b", (2, 1, 1, E), (E,), lambda b: b[0].reshape(-1))
            add(mlp + "up_proj.bias", m + "ffw_up.b", (2, 1, 1, E), (E,), lambda b: b[1].reshape(-1))
            add(mlp + "down_proj.weight", m + "ffw_down.weight", (D, E))
            add(mlp + "down_proj.bias", m + "ffw_down.bias", (D,))
        add("model.final_norm.weight", "final_norm.scale", (D,))

        for _, key, expected, _, _ in plan:
            shape = self._shape(key)
            if shape != expected:
                raise CheckpointError(f"{self.source.name}: tensor '{key}' has shape {shape}, expected {expected}")
        unused = sorted(self.keys - {key for _, key, _, _, _ in plan})
        if unused:
            more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
            raise CheckpointError(f"{self.source.name}: unexpected tensor '{unused[0]}'{more} for RecurrentGemma")
        return [self._tensor(out, key, shape, transform) for out, key, _, shape, transform in plan]

    def _tensor(self, out: str, key: str, shape: tuple[int, ...], transform: Callable | None) -> PlannedTensor:
        get = self.source.get
        if transform is None:
            return PlannedTensor(out, shape, self.source.dtype(key), lambda: get(key))
        return PlannedTensor(out, shape, self.source.dtype(key), lambda: transform(get(key)))


# --- config -------------------------------------------------------------------------------------------


def _cycled(pattern: list[str] | tuple[str, ...], layers: int) -> list[str]:
    return [pattern[i % len(pattern)] for i in range(layers)]


def block_pattern(layer_types: list[str]) -> list[str]:
    """The shortest pattern that, cycled, gives every layer's kind."""
    for size in range(1, len(layer_types) + 1):
        if _cycled(layer_types[:size], len(layer_types)) == layer_types:
            return layer_types[:size]
    return layer_types


def matching_preset(layout: Layout) -> tuple[str, dict[str, Any]] | None:
    """The released size (name, config values) whose weights have these shapes."""
    for name, preset in _family().presets.items():
        heads = preset["num_attention_heads"]
        head_dim = preset["hidden_size"] // heads
        checks = [
            preset["vocab_size"] <= layout.embedding_rows,
            preset["hidden_size"] == layout.hidden_size,
            preset["intermediate_size"] == 2 * layout.mlp_width,
            _cycled(preset.get("block_types") or DEFAULT_PATTERN, preset["num_hidden_layers"]) == layout.layer_types,
            layout.lru_width in (None, preset.get("lru_width") or preset["hidden_size"]),
            layout.num_attention_heads in (None, heads),
            layout.conv1d_width in (None, preset.get("conv1d_width", 4)),
            layout.kv_width in (None, (preset.get("num_key_value_heads") or heads) * head_dim),
        ]
        if all(checks):
            return name, preset
    return None


def _overrides(options: ConvertOptions) -> dict[str, Any]:
    """--config's values under their field names (`_block_types`, `sliding_window` are aliases)."""
    values = {}
    for key, value in options.config_overrides().items():
        values[RecurrentGemmaConfig.aliases.get(key, key)] = value
    return values


def recurrent_gemma_config(
    layout: Layout, options: ConvertOptions, source: str, notes: list[str]
) -> RecurrentGemmaConfig:
    """The converted model's config: the shapes, with --config's values checked against them."""
    overrides = _overrides(options)
    config_source = str(options.config_file or source)
    preset = matching_preset(layout)
    D = layout.hidden_size

    def contradiction(key: str, value: Any) -> ConfigError:
        return ConfigError(f"{config_source}: '{key}' is {overrides[key]!r}, but the checkpoint has {value}")

    heads = layout.num_attention_heads
    if heads is None:  # no recurrent block: nothing has one block per head
        heads = overrides.get("num_attention_heads") or (preset[1]["num_attention_heads"] if preset else None)
        if heads is None:
            raise ConfigError(
                f"{source}: the weights do not tell the number of attention heads (no recurrent block); "
                "pass --config with a config.json giving num_attention_heads"
            )
    if not isinstance(heads, int) or heads <= 0 or D % heads:
        raise ConfigError(f"{config_source}: num_attention_heads {heads!r} does not divide the width {D}")
    head_dim = D // heads
    derived: dict[str, Any] = {
        "hidden_size": D,
        "intermediate_size": 2 * layout.mlp_width,
        "num_hidden_layers": len(layout.layer_types),
        "num_attention_heads": heads,
        "attention_bias": False,  # the authors' q/k/v projections have none
    }
    if layout.kv_width is not None:
        if layout.kv_width % head_dim:
            raise CheckpointError(
                f"{source}: the key projection's {layout.kv_width} rows are not a whole number of heads of {head_dim}"
            )
        derived["num_key_value_heads"] = layout.kv_width // head_dim
    for key, value in (("lru_width", layout.lru_width), ("conv1d_width", layout.conv1d_width)):
        if value is not None:
            derived[key] = value
    for key, value in derived.items():
        if key in overrides and overrides[key] != value:
            if key == "lru_width" and overrides[key] is None and value == D:
                continue  # None means hidden_size
            raise contradiction(key, value)
    if "head_dim" in overrides and overrides["head_dim"] != head_dim:
        raise contradiction("head_dim", head_dim)
    if overrides.get("tie_word_embeddings") is False:
        raise ConfigError(
            f"{config_source}: 'tie_word_embeddings' is false, but RecurrentGemma's output layer is the embedding"
        )

    rows = layout.embedding_rows
    if "vocab_size" in overrides:
        vocab = overrides["vocab_size"]
        if not isinstance(vocab, int) or not 0 < vocab <= rows:
            raise ConfigError(f"{config_source}: 'vocab_size' is {vocab!r}, but the embedding has {rows} rows")
    else:
        vocab = preset[1]["vocab_size"] if preset else rows
    derived["vocab_size"] = vocab
    if vocab < rows:
        notes.append(f"embedding rows {vocab}..{rows - 1} (padding) dropped")

    if "block_types" in overrides:
        given = overrides["block_types"]
        if not isinstance(given, list) or not given or _cycled(given, len(layout.layer_types)) != layout.layer_types:
            raise ConfigError(
                f"{config_source}: 'block_types' is {given!r}, but the checkpoint's blocks are {layout.layer_types}"
            )
    else:
        derived["block_types"] = block_pattern(layout.layer_types)

    unseen = [key for key in UNSEEN_DEFAULTS if key not in overrides]
    if unseen and preset:
        derived.update({key: preset[1][key] for key in unseen})
        notes.append(f"{' and '.join(unseen)} taken from the released {preset[0]} size")
    elif unseen:
        derived.update({key: UNSEEN_DEFAULTS[key] for key in unseen})
        told = ", ".join(f"{key} {UNSEEN_DEFAULTS[key]}" for key in unseen)
        notes.append(f"not in the weights, defaults used: {told} (pass --config to set them)")

    settings = {k: v for k, v in overrides.items() if k not in ("architectures", "dtype", "torch_dtype", "head_dim")}
    config = RecurrentGemmaConfig.from_dict({**settings, **derived}, source=config_source)
    if config.rope_parameters is None:
        # Written out in full, as transformers writes it.
        config.rope_parameters = {
            "rope_type": "default", "rope_theta": config.rope_base, "partial_rotary_factor": config.rotary_fraction,
        }
    return config


# --- converters ---------------------------------------------------------------------------------------


def _pt_file(src: Path) -> Path | None:
    """src, or the only .pt file in the folder src (a release folder: `2b.pt`, `tokenizer.model`)."""
    if src.is_file():
        return src
    if src.is_dir():
        files = [p for p in src.iterdir() if p.suffix == ".pt" and p.is_file()]
        return files[0] if len(files) == 1 else None
    return None


class RecurrentGemmaPytorchConverter:
    name = "recurrentgemma-pytorch"
    description = "the authors' RecurrentGemma .pt (a bare state dict of recurrentgemma.torch.Griffin)"

    def detect(self, src: Path) -> bool:
        path = _pt_file(src)
        if path is None or path.suffix == ".safetensors":
            return False
        text = pickle_text(path)
        return b"embedder.input_embedding" in text and b"blocks.0." in text and (
            b"recurrent_block" in text or b"attention_block" in text
        )

    def plan(self, src: Path, options: ConvertOptions) -> ConversionPlan:
        path = _pt_file(src)
        if path is None:
            raise CheckpointError(f"{src}: expected the authors' .pt file (or a folder holding exactly one)")
        reader = Reader(TorchSource(path))
        notes: list[str] = []
        config = recurrent_gemma_config(reader.layout(), options, str(path), notes)
        tensors = reader.planned(config)
        files = find_tokenizer(options, [path.parent / "tokenizer.model"], notes, _family())
        return ConversionPlan(_family(), config, tensors, self.name, files, notes)


class RecurrentGemmaOrbaxConverter:
    name = "recurrentgemma-orbax"
    description = f"the authors' RecurrentGemma JAX/Flax orbax folder ({{'params': ...}}; needs {ORBAX_INSTALL})"

    def detect(self, src: Path) -> bool:
        text = orbax_metadata_text(src)
        blocks = b"recurrent_block" in text or b"attention_block" in text
        return b"embedder" in text and b"blocks.0" in text and blocks

    def plan(self, src: Path, options: ConvertOptions) -> ConversionPlan:
        if not src.is_dir():
            raise CheckpointError(f"{src}: expected an orbax checkpoint folder")
        source = OrbaxSource(src)
        reader = Reader(source)
        notes: list[str] = []
        config = recurrent_gemma_config(reader.layout(), options, source.name, notes)
        tensors = reader.planned(config)
        near = [source.root / "tokenizer.model", source.root.parent / "tokenizer.model"]
        files = find_tokenizer(options, near, notes, _family())
        return ConversionPlan(_family(), config, tensors, self.name, files, notes)
