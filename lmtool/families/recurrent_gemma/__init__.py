"""RecurrentGemma (Griffin): google/recurrentgemma-2b, -9b and their -it variants."""

from ...registry import Family
from ..gemma import TOKENIZER_CONFIG as GEMMA_TOKENIZER_CONFIG
from ..gemma.chat import format_chat
from .config import RecurrentGemmaConfig
from .convert import RecurrentGemmaOrbaxConverter, RecurrentGemmaPytorchConverter
from .model import RecurrentGemmaModel


def _preset(hidden: int, layers: int, heads: int) -> dict:
    # intermediate_size is twice the MLP width (3 x hidden), as transformers counts it.
    return dict(
        vocab_size=256000, hidden_size=hidden, intermediate_size=6 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=1, lru_width=hidden, attention_window_size=2048,
        conv1d_width=4, logits_soft_cap=30.0, dtype="bfloat16",
    )


FAMILY = Family(
    model_type="recurrent_gemma",
    class_prefix="RecurrentGemma",
    config_class=RecurrentGemmaConfig,
    backbone_class=RecurrentGemmaModel,
    backbone_prefix="model",
    add_bos_token=True,
    chat_format=format_chat,  # the -it models use Gemma's turn format
    tokenizer_config=GEMMA_TOKENIZER_CONFIG,  # the same tokenizer as Gemma's
    soft_cap=lambda config: config.soft_cap,
    converters={
        RecurrentGemmaPytorchConverter.name: RecurrentGemmaPytorchConverter(),
        RecurrentGemmaOrbaxConverter.name: RecurrentGemmaOrbaxConverter(),
    },
    presets={
        "recurrentgemma-2b": _preset(2560, 26, 10),
        "recurrentgemma-9b": _preset(4096, 38, 16),
    },
)
