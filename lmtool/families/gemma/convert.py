"""Gemma v1 original checkpoints -> the standard layout (see lmtool.convert for the protocol).

gemma-pytorch: gemma_pytorch's `torch.save({'model_state_dict': sd})` .ckpt (or a folder of bare
    state-dict shards with pytorch_model.bin.index.json). Keys already have transformers' names
    except `embedder.weight` and the fused `qkv_proj` ([all Q heads | K heads | V heads] rows);
    `freqs_cis` is a rotary table and is dropped. The int8 variant stores each weight as int8 with
    a per-row `weight_scaler`; we dequantize to float32 (--dtype casts further), because the
    standard layout has no int8 Gemma.
gemma-orbax: the JAX/Flax release, an orbax PyTree checkpoint with keys such as
    `transformer/layer_0/attn/q_einsum` -> {'w': (H, D, hd)}; einsum weights are reshaped to
    Linear weights, and the embedding's padding rows (256128 -> 256000) are trimmed.

What the shapes cannot tell (the head count against head_dim) comes from --config, else from the
format itself (gemma_pytorch's freqs_cis has head_dim/2 columns; the einsum weights have a head
axis), else from a released size whose shapes match.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from ...checkpoint import PlannedTensor
from ...convert import ConversionPlan, ConvertOptions, find_tokenizer
from ...errors import CheckpointError, ConfigError
from ...original_formats import ORBAX_INSTALL, OrbaxArrays, load_state_dict, orbax_metadata_text, pickle_text
from .config import GemmaConfig

PYTORCH_INDEX = "pytorch_model.bin.index.json"
LAYER_KEY = re.compile(r"(?:^|[./])layer(?:s\.|_)(\d+)[./]")

# The module names of one decoder layer's weights in the standard layout, in writing order.
LAYER_WEIGHTS = (
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass
class Shapes:
    """What a checkpoint's tensors say about the architecture."""

    embedding_rows: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    q_width: int  # num_attention_heads * head_dim
    kv_width: int  # num_key_value_heads * head_dim
    head_dim: int | None = None  # when the format tells it
    max_position_embeddings: int | None = None


# --- config --------------------------------------------------------------------------------------


def matching_preset(shapes: Shapes) -> tuple[str, dict[str, Any]] | None:
    """The released size (name, config values) whose weights have these shapes."""
    for name, preset in _family().presets.items():
        hd = preset["head_dim"]
        if (
            preset["hidden_size"] == shapes.hidden_size
            and preset["intermediate_size"] == shapes.intermediate_size
            and preset["num_attention_heads"] * hd == shapes.q_width
            and preset["num_key_value_heads"] * hd == shapes.kv_width
        ):
            return name, preset
    return None


def _head_dim(shapes: Shapes, overrides: dict[str, Any], source: str, notes: list[str]) -> int:
    if overrides.get("head_dim"):
        return int(overrides["head_dim"])
    if overrides.get("num_attention_heads"):
        return shapes.q_width // int(overrides["num_attention_heads"])
    if shapes.head_dim:
        return shapes.head_dim
    preset = matching_preset(shapes)
    if preset:
        notes.append(f"head count and head_dim taken from the released {preset[0]} size")
        return preset[1]["head_dim"]
    raise ConfigError(
        f"{source}: the weights do not tell the number of attention heads (hidden {shapes.hidden_size}, "
        f"query width {shapes.q_width}, key/value width {shapes.kv_width} match no released Gemma size); "
        "pass --config with a config.json giving num_attention_heads, num_key_value_heads and head_dim"
    )


def _vocab_size(shapes: Shapes, overrides: dict[str, Any], tokenizer_size: int | None, source: str) -> int:
    """--config's vocab_size, else (for a padded embedding) the tokenizer's or the released size's,
    else every embedding row."""
    rows = shapes.embedding_rows
    if overrides.get("vocab_size"):
        vocab, origin = overrides["vocab_size"], "vocab_size"
    elif tokenizer_size:
        vocab, origin = tokenizer_size, "the tokenizer's vocabulary"
    else:
        preset = matching_preset(shapes)
        vocab = preset[1]["vocab_size"] if preset and preset[1]["vocab_size"] <= rows else rows
        origin = "vocab_size"
    if vocab > rows:
        raise ConfigError(f"{source}: {origin} ({vocab}) is larger than the embedding ({rows} rows)")
    return vocab


def gemma_config(
    shapes: Shapes, options: ConvertOptions, source: str, notes: list[str], tokenizer_size: int | None = None
) -> GemmaConfig:
    """The config of the converted model: --config's values, checked against the shapes.
    tokenizer_size: the tokenizer's number of ids, for an embedding padded past it (orbax)."""
    overrides = options.config_overrides()
    config_source = str(options.config_file or source)
    hd = _head_dim(shapes, overrides, source, notes)
    if shapes.head_dim and hd != shapes.head_dim:
        raise ConfigError(f"{config_source}: head_dim would be {hd}, but the checkpoint has {shapes.head_dim}")
    if hd <= 0 or shapes.q_width % hd or shapes.kv_width % hd:
        raise ConfigError(
            f"{config_source}: head_dim {hd} does not divide the query/key/value widths "
            f"({shapes.q_width}, {shapes.kv_width})"
        )
    derived: dict[str, Any] = {
        "vocab_size": _vocab_size(shapes, overrides, tokenizer_size, source),
        "hidden_size": shapes.hidden_size,
        "intermediate_size": shapes.intermediate_size,
        "num_hidden_layers": shapes.num_hidden_layers,
        "num_attention_heads": shapes.q_width // hd,
        "num_key_value_heads": shapes.kv_width // hd,
        "head_dim": hd,
    }
    for key, value in derived.items():
        if key in overrides and overrides[key] != value:
            raise ConfigError(f"{config_source}: '{key}' is {overrides[key]!r}, but the checkpoint has {value}")
    if shapes.max_position_embeddings and "max_position_embeddings" not in overrides:
        derived["max_position_embeddings"] = shapes.max_position_embeddings
    settings = {k: v for k, v in overrides.items() if k not in ("architectures", "dtype", "torch_dtype")}
    config = GemmaConfig.from_dict({**settings, **derived}, source=config_source)
    if config.rope_parameters is None:
        # Written out in full: transformers cannot build rotary tables from "rope_theta": null.
        config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_base}
    if config.vocab_size < shapes.embedding_rows:
        notes.append(f"embedding rows {config.vocab_size}..{shapes.embedding_rows - 1} (padding) dropped")
    return config


def _family():
    from . import FAMILY  # not at import time: FAMILY is built from this module's converters

    return FAMILY


def tokenizer_size(files: dict[str, bytes]) -> int | None:
    """How many ids the tokenizer among the output files has."""
    if "tokenizer.json" not in files:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_str(files["tokenizer.json"].decode("utf-8")).get_vocab_size(with_added_tokens=True)


# --- gemma_pytorch -------------------------------------------------------------------------------


class GemmaPytorchSource:
    """The tensors of a gemma_pytorch checkpoint (one file or shards with an index)."""

    def __init__(self, src: Path):
        self.src = src
        self.tensors: dict[str, torch.Tensor] = {}
        for shard in self._files(src):
            self.tensors.update(load_state_dict(shard))
        self.quantized = any(k.endswith("weight_scaler") for k in self.tensors)

    @staticmethod
    def _files(src: Path) -> list[Path]:
        if src.is_file():
            return [src]
        index = src / PYTORCH_INDEX
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except FileNotFoundError:
            raise CheckpointError(f"{src}: no {PYTORCH_INDEX} (a gemma_pytorch folder is shards and their index)") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: not a valid index (expected a 'weight_map' object)") from None
        return [src / name for name in names]

    def _get(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise CheckpointError(f"{self.src}: no tensor '{key}'; is this a gemma_pytorch Gemma v1 checkpoint?")
        return self.tensors[key]

    def shapes(self) -> Shapes:
        rows, hidden = self._get("embedder.weight").shape
        layers = {int(m.group(1)) for k in self.tensors if (m := LAYER_KEY.search(k))}
        if layers != set(range(len(layers))) or not layers:
            raise CheckpointError(f"{self.src}: decoder layers are missing or misnumbered ({sorted(layers)})")
        qkv_rows = self._get("model.layers.0.self_attn.qkv_proj.weight").shape[0]
        q_width = self._get("model.layers.0.self_attn.o_proj.weight").shape[1]
        shapes = Shapes(
            embedding_rows=rows,
            hidden_size=hidden,
            intermediate_size=self._get("model.layers.0.mlp.gate_proj.weight").shape[0],
            num_hidden_layers=len(layers),
            q_width=q_width,
            kv_width=(qkv_rows - q_width) // 2,
        )
        if "freqs_cis" in self.tensors:
            # gemma_pytorch builds it as (2 * max_position_embeddings, head_dim / 2).
            positions, half = self.tensors["freqs_cis"].shape
            shapes.head_dim, shapes.max_position_embeddings = 2 * half, positions // 2
        return shapes

    def check_rope(self, config: GemmaConfig) -> None:
        """freqs_cis was computed with the model's rope theta: refuse a config that disagrees."""
        table = self.tensors.get("freqs_cis")
        if table is None or table.shape[0] < 2:
            return
        hd = config.head_dim
        expected = 1.0 / config.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        stored = torch.angle(table[1].to(torch.complex128))
        if not torch.allclose(stored, expected, rtol=1e-4, atol=1e-6):
            theta = float(stored[1] ** (-hd / 2)) if hd > 2 else float("nan")
            raise ConfigError(
                f"{self.src}: freqs_cis was computed with rope theta ~{theta:.4g}, not {config.rope_base:g}; "
                "pass --config with the right rope_theta"
            )

    def _weight(self, name: str, key: str, rows: slice) -> PlannedTensor:
        """Output tensor `name`: rows of the weight at key, dequantized when int8."""
        weight = self._get(key)
        shape = (len(range(*rows.indices(weight.shape[0]))), *weight.shape[1:])
        if weight.dtype == torch.int8:
            scaler_key = key + "_scaler"
            if scaler_key not in self.tensors:
                raise CheckpointError(f"{self.src}: int8 tensor '{key}' has no '{scaler_key}'")
            return PlannedTensor(name, shape, torch.float32, partial(self._dequantized, key, rows))
        # A quantized checkpoint is written all in float32, not float32 weights with bf16 norms.
        dtype = torch.float32 if self.quantized and weight.is_floating_point() else weight.dtype
        return PlannedTensor(name, shape, dtype, lambda: weight[rows])

    def _dequantized(self, key: str, rows: slice) -> torch.Tensor:
        weight, scaler = self.tensors[key][rows], self.tensors[key + "_scaler"][rows]
        return weight.to(torch.float32) * scaler.to(torch.float32)[:, None]

    def planned(self, config: GemmaConfig) -> list[PlannedTensor]:
        H, K, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        # Fused rows are [H query heads | K key heads | K value heads], each head_dim rows.
        qkv_rows = {
            "q_proj": slice(0, H * hd),
            "k_proj": slice(H * hd, (H + K) * hd),
            "v_proj": slice((H + K) * hd, (H + 2 * K) * hd),
        }
        every_row = slice(None)
        # output module -> (source key, its rows)
        sources = {"model.embed_tokens": ("embedder.weight", slice(0, config.vocab_size))}
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}."
            for module in LAYER_WEIGHTS:
                projection = module.removeprefix("self_attn.")
                if projection in qkv_rows:
                    sources[prefix + module] = (prefix + "self_attn.qkv_proj.weight", qkv_rows[projection])
                else:
                    sources[prefix + module] = (prefix + module + ".weight", every_row)
        sources["model.norm"] = ("model.norm.weight", every_row)
        self._check_all_used({key for key, _ in sources.values()})
        return [self._weight(module + ".weight", key, rows) for module, (key, rows) in sources.items()]

    def _check_all_used(self, used: set[str]) -> None:
        for key in self.tensors:
            if key == "freqs_cis" or (key.endswith("_scaler") and key.removesuffix("_scaler") in used):
                continue
            if key not in used:
                raise CheckpointError(f"{self.src}: unexpected tensor '{key}' for Gemma v1 (a later Gemma version?)")


class GemmaPytorchConverter:
    name = "gemma-pytorch"
    description = "gemma_pytorch .ckpt ({'model_state_dict': ...}, fused qkv_proj; int8 with weight_scaler)"

    def detect(self, src: Path) -> bool:
        if src.is_dir():
            index = src / PYTORCH_INDEX
            return index.is_file() and '"embedder.weight"' in index.read_text(errors="replace")
        if not src.is_file() or src.suffix == ".safetensors":
            return False
        text = pickle_text(src)
        return b"embedder.weight" in text and b"qkv_proj" in text

    def plan(self, src: Path, options: ConvertOptions) -> ConversionPlan:
        source = GemmaPytorchSource(src)
        notes: list[str] = []
        config = gemma_config(source.shapes(), options, str(src), notes)
        source.check_rope(config)
        tensors = source.planned(config)
        if source.quantized:
            notes.append("int8 weights dequantized (weight * weight_scaler) to float32; --dtype casts them")
        folder = src if src.is_dir() else src.parent
        files = find_tokenizer(options, [folder / "tokenizer.model"], notes, _family())
        return ConversionPlan(_family(), config, tensors, self.name, files, notes)


# --- orbax (JAX/Flax) ----------------------------------------------------------------------------


def _heads_to_linear(w: torch.Tensor, index: int | None) -> torch.Tensor:
    """An einsum weight (heads, D, hd) (w[index] when stacked) -> Linear rows head by head."""
    w = w[index] if index is not None else w
    heads, D, hd = w.shape
    return w.permute(0, 2, 1).reshape(heads * hd, D)


class OrbaxSource(OrbaxArrays):
    """The arrays of a Gemma v1 orbax checkpoint, restored one at a time."""

    what = "a Gemma v1 Flax checkpoint"

    def shapes(self) -> Shapes:
        rows, hidden = self.shape("transformer/embedder/input_embedding")
        layers = {int(m.group(1)) for name in self.arrays if (m := LAYER_KEY.search(name))}
        if layers != set(range(len(layers))) or not layers:
            raise CheckpointError(f"{self.root}: decoder layers are missing or misnumbered ({sorted(layers)})")
        heads, head_dim, _ = self.shape("transformer/layer_0/attn/attn_vec_einsum/w")
        if "transformer/layer_0/attn/qkv_einsum/w" in self.arrays:
            kv_heads = heads
        else:
            kv_heads = self.shape("transformer/layer_0/attn/kv_einsum/w")[1]
        return Shapes(
            embedding_rows=rows,
            hidden_size=hidden,
            intermediate_size=self.shape("transformer/layer_0/mlp/linear/w")[0],
            num_hidden_layers=len(layers),
            q_width=heads * head_dim,
            kv_width=kv_heads * head_dim,
            head_dim=head_dim,
        )

    def _einsum_projections(self, i: int) -> dict[str, tuple[str, int | None]]:
        """q/k/v: (array, index of its leading axis or None) of layer i."""
        attn = f"transformer/layer_{i}/attn/"
        if attn + "qkv_einsum/w" in self.arrays:
            fused = attn + "qkv_einsum/w"  # (3, H, D, hd): multi-head (7b)
            return {"q_proj": (fused, 0), "k_proj": (fused, 1), "v_proj": (fused, 2)}
        kv = attn + "kv_einsum/w"  # (2, K, D, hd) beside q_einsum (H, D, hd)
        return {"q_proj": (attn + "q_einsum/w", None), "k_proj": (kv, 0), "v_proj": (kv, 1)}

    def planned(self, config: GemmaConfig) -> list[PlannedTensor]:
        D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
        H, K, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        embedding = "transformer/embedder/input_embedding"
        tensors = [self._plan("model.embed_tokens.weight", embedding, (V, D), lambda w: w[:V])]
        for i in range(config.num_hidden_layers):
            layer, out = f"transformer/layer_{i}", f"model.layers.{i}."
            tensors.append(self._plan(out + "input_layernorm.weight", f"{layer}/pre_attention_norm/scale", (D,), None))
            for projection, (name, index) in self._einsum_projections(i).items():
                heads = H if projection == "q_proj" else K
                to_linear = partial(_heads_to_linear, index=index)
                tensors.append(self._plan(out + f"self_attn.{projection}.weight", name, (heads * hd, D), to_linear))
            # (H, hd, D) -> (D, H * hd)
            tensors.append(self._plan(out + "self_attn.o_proj.weight", f"{layer}/attn/attn_vec_einsum/w", (D, H * hd),
                                      lambda w: w.permute(2, 0, 1).reshape(D, H * hd)))
            tensors.append(self._plan(out + "post_attention_layernorm.weight", f"{layer}/pre_ffw_norm/scale", (D,), None))
            gating = f"{layer}/mlp/gating_einsum/w"  # (2, D, F): gate then up
            tensors.append(self._plan(out + "mlp.gate_proj.weight", gating, (F, D), lambda w: w[0].T))
            tensors.append(self._plan(out + "mlp.up_proj.weight", gating, (F, D), lambda w: w[1].T))
            tensors.append(self._plan(out + "mlp.down_proj.weight", f"{layer}/mlp/linear/w", (D, F), lambda w: w.T))
        tensors.append(self._plan("model.norm.weight", "transformer/final_norm/scale", (D,), None))
        return tensors

    def _plan(self, out: str, name: str, shape: tuple[int, ...], transform: Callable | None) -> PlannedTensor:
        dtype = self.dtype(name)  # a missing array fails here, at planning, not midway through writing
        if transform is None:
            return PlannedTensor(out, shape, dtype, lambda: self.array(name))
        return PlannedTensor(out, shape, dtype, lambda: transform(self.array(name)))


class GemmaOrbaxConverter:
    name = "gemma-orbax"
    description = f"Gemma v1 JAX/Flax orbax checkpoint folder (needs {ORBAX_INSTALL})"

    def detect(self, src: Path) -> bool:
        return b"transformer/embedder" in orbax_metadata_text(src)

    def plan(self, src: Path, options: ConvertOptions) -> ConversionPlan:
        source = OrbaxSource(src)
        notes: list[str] = []
        near = [source.root / "tokenizer.model", source.root.parent / "tokenizer.model"]
        files = find_tokenizer(options, near, notes, _family())
        # The embedding is padded (256128 rows for 256000 ids): the tokenizer says where ids end.
        config = gemma_config(source.shapes(), options, str(src), notes, tokenizer_size(files))
        return ConversionPlan(_family(), config, source.planned(config), self.name, files, notes)
