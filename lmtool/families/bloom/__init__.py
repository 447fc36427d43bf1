"""BLOOM: bigscience/bloom-560m ... bigscience/bloom (176B), and their fine-tunes (bloomz, ...)."""

from ...registry import Family
from .config import BloomConfig
from .convert import MEGATRON
from .flax import FLAX
from .model import BloomModel

# Top-level module names of BloomModel: hub checkpoints saved from it lack the `transformer.` prefix.
_BACKBONE_MODULES = {"word_embeddings", "word_embeddings_layernorm", "h", "ln_f"}


def add_prefix(key: str) -> str:
    return f"transformer.{key}" if key.split(".", 1)[0] in _BACKBONE_MODULES else key


def _preset(hidden: int, layers: int, heads: int) -> dict:
    return dict(vocab_size=250880, hidden_size=hidden, n_layer=layers, n_head=heads)


FAMILY = Family(
    model_type="bloom",
    class_prefix="Bloom",
    config_class=BloomConfig,
    backbone_class=BloomModel,
    backbone_prefix="transformer",
    head_names={"token-classification": "classifier"},
    add_bos_token=False,
    padding_side="left",
    tokenizer_config={
        "tokenizer_class": "BloomTokenizerFast",
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_prefix_space": False,
        "padding_side": "left",
    },
    rename_key=add_prefix,
    converters={MEGATRON.name: MEGATRON, FLAX.name: FLAX},
    presets={
        "bloom-560m": _preset(1024, 24, 16),
        "bloom-1b1": _preset(1536, 24, 16),
        "bloom-1b7": _preset(2048, 24, 16),
        "bloom-3b": _preset(2560, 30, 32),
        "bloom-7b1": _preset(4096, 30, 32),
        "bloom": _preset(14336, 70, 112),
    },
)
