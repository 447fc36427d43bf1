"""The domain values that the CLI, its shell completions, recipes and the library share.

Plain data and string checks only, importable without torch, so that `--help` and every TAB press
stay instant. The library checks its own lists against these in tests (tests/test_shell.py).
"""

from __future__ import annotations

# config.json's "model_type" of each family lmtool implements.
FAMILIES = ("gemma", "bloom", "recurrent_gemma", "zamba2")

# `convert --from`: the original checkpoint formats, then the standard layout (re-cast, re-shard).
CONVERT_FORMATS = (
    "gemma-pytorch",
    "gemma-orbax",
    "gemma-flax",
    "recurrentgemma-pytorch",
    "recurrentgemma-orbax",
    "bloom-megatron",
    "bloom-flax",
    "standard",
)

# Floating dtypes a model runs in or is written as; "auto" keeps the checkpoint's.
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *DTYPES)
# What users type from other tools (llama.cpp, mlx-lm, PyTorch) for the same dtypes.
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# `--device`: these, or cuda:N for the N-th GPU.
DEVICE_CHOICES = ("auto", "cpu", "cuda")

# Weight quantization schemes (`lmtool quantize --scheme`): int8 per output row (symmetric);
# int4 per group with a scale and zero point (asymmetric); int4-m: int4 with the value and down
# projections of llama.cpp's Q4_K_M layers kept at int8.
QUANT_SCHEMES = ("int8", "int4", "int4-m")

# `bench --preset`: the released shapes the families know (their `presets`), run with random weights.
BENCH_PRESETS = (
    "gemma-2b", "gemma-7b",
    "bloom-560m", "bloom-1b1", "bloom-1b7", "bloom-3b", "bloom-7b1", "bloom",
    "recurrentgemma-2b", "recurrentgemma-9b",
    "zamba2-1.2b", "zamba2-2.7b", "zamba2-7b",
)

# `tag --aggregation`: the strategies of transformers' token-classification pipeline.
AGGREGATIONS = ("none", "simple", "first", "average", "max")


def canonical_dtype(name: str) -> str | None:
    """The dtype a name or alias stands for ("auto" stays "auto"); None when it is not one."""
    name = DTYPE_ALIASES.get(name.lower(), name.lower())
    return name if name in DTYPE_CHOICES else None


def is_device(name: str) -> bool:
    """auto, cpu, cuda or cuda:N (N a non-negative integer)."""
    kind, _, index = name.partition(":")
    if not index:
        return name in DEVICE_CHOICES
    return kind == "cuda" and index.isdigit()
