"""Gemma (v1): google/gemma-2b, google/gemma-7b and their -it variants."""

from ...registry import Family
from .chat import format_chat
from .config import GemmaConfig
from .convert import GemmaOrbaxConverter, GemmaPytorchConverter
from .flax import FLAX as FLAX_CONVERTER
from .model import GemmaModel

# What google/gemma-* (and google/recurrentgemma-*) ship; `lmtool convert` writes it (with the
# tokenizer's own special tokens).
TOKENIZER_CONFIG = {
    "tokenizer_class": "GemmaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
    "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
    "padding_side": "left",
    "clean_up_tokenization_spaces": False,
}

FAMILY = Family(
    model_type="gemma",
    class_prefix="Gemma",
    config_class=GemmaConfig,
    backbone_class=GemmaModel,
    backbone_prefix="model",
    add_bos_token=True,
    chat_format=format_chat,
    tokenizer_config=TOKENIZER_CONFIG,
    converters={
        GemmaPytorchConverter.name: GemmaPytorchConverter(),
        GemmaOrbaxConverter.name: GemmaOrbaxConverter(),
        FLAX_CONVERTER.name: FLAX_CONVERTER,
    },
    presets={
        "gemma-2b": dict(
            vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
            num_attention_heads=8, num_key_value_heads=1, head_dim=256, dtype="bfloat16",
        ),
        "gemma-7b": dict(
            vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=16, head_dim=256, dtype="bfloat16",
        ),
    },
)
