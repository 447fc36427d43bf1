"""Zamba2 (Zyphra): Zyphra/Zamba2-1.2B, Zamba2-2.7B, Zamba2-7B and their -instruct variants.

Zyphra ships the standard layout (transformers' names), so there are no converters.
"""

import re

from ...registry import Family
from .config import Zamba2Config, default_block_types
from .model import Zamba2Model

# Mistral-v0.1's SentencePiece BPE (32000 pieces, byte fallback, "▁" prefix on the first word):
# <unk>=0, <s>=1 (added at the start), </s>=2; batches are padded on the left.
TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "padding_side": "left",
    "clean_up_tokenization_spaces": False,
}


def decode_reads(config: Zamba2Config, name: str) -> int:
    """A shared block's weights (saved under the first hybrid layer that uses it) are read once
    per invocation of the block; its per-invocation adapters, and everything else, once."""
    match = re.match(r"model\.layers\.(\d+)\.shared_transformer\.", name)
    if match is None or "adapter_list" in name or int(match.group(1)) not in config.hybrid_ids:
        return 1
    block = config.hybrid_ids.index(int(match.group(1))) % config.num_mem_blocks
    return sum(j % config.num_mem_blocks == block for j in range(len(config.hybrid_ids)))


def _pattern(layers: int, hybrid: list[int]) -> list[str]:
    return ["hybrid" if i in hybrid else "mamba" for i in range(layers)]


def _preset(hidden: int, layers: list[str], mlp: int, mamba_heads: int, **more) -> dict:
    return dict(
        vocab_size=32000, hidden_size=hidden, num_hidden_layers=len(layers), layers_block_type=layers,
        intermediate_size=mlp, num_attention_heads=32, num_key_value_heads=32, n_mamba_heads=mamba_heads,
        mamba_d_state=64, mamba_d_conv=4, mamba_expand=2, adapter_rank=128, dtype="bfloat16", **more,
    )


FAMILY = Family(
    model_type="zamba2",
    class_prefix="Zamba2",
    config_class=Zamba2Config,
    backbone_class=Zamba2Model,
    backbone_prefix="model",
    add_bos_token=True,
    add_eos_token=False,
    padding_side="left",
    tokenizer_config=TOKENIZER_CONFIG,
    decode_reads=decode_reads,
    presets={
        # Shapes from architectures.md §5.1, not checked against the hub's config.json. 1.2B: heads,
        # KV heads, MLP width (4 x hidden), mamba heads, d_state, ngroups and the attention
        # adapters are unverified; the hybrid layer ids come from the llama.cpp Zamba2 port.
        "zamba2-1.2b": _preset(
            2048, _pattern(38, [5, 11, 17, 23, 29, 35]), 8192, 64, mamba_ngroups=1, num_mem_blocks=1,
            use_mem_rope=True, use_shared_attention_adapter=True,
        ),
        # 2.7B: transformers' defaults (54 layers, hybrid at 6, 12, ..., 42, 47, 51).
        "zamba2-2.7b": _preset(
            2560, default_block_types(), 10240, 80, mamba_ngroups=1, num_mem_blocks=2,
            use_mem_rope=False, use_shared_attention_adapter=False,
        ),
        # 7B: from Zyphra's pre-HF config (81 layers, hybrid at 6, 11, then every 6 to 77).
        "zamba2-7b": _preset(
            3584, _pattern(81, [6, *range(11, 78, 6)]), 14336, 112, mamba_ngroups=2, num_mem_blocks=2,
            use_mem_rope=True, use_shared_attention_adapter=False,
        ),
    },
)
