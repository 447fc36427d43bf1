from __future__ import annotations

from dataclasses import dataclass

from ...config import ModelConfig, check_rope_type, rope_setting
from ...errors import ConfigError


@dataclass
class GemmaConfig(ModelConfig):
    """Gemma v1. Defaults are transformers' (they describe gemma-7b)."""

    model_type = "gemma"

    vocab_size: int = 256000
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 256  # independent of hidden_size / num_attention_heads
    hidden_act: str = "gelu_pytorch_tanh"
    hidden_activation: str | None = None  # older configs; takes precedence over hidden_act
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None  # legacy key; rope_parameters["rope_theta"] wins
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    use_bidirectional_attention: bool | None = None
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1

    @property
    def activation(self) -> str:
        if self.hidden_activation is not None:
            return self.hidden_activation
        # The released configs say "gelu" but the models were trained with the tanh approximation.
        return "gelu_pytorch_tanh" if self.hidden_act == "gelu" else self.hidden_act

    @property
    def rope_base(self) -> float:
        return rope_setting(self.rope_parameters, "rope_theta", self.rope_theta, 10000.0)

    def validate(self, source: str) -> None:
        super().validate(source)
        from ...layers import ACTIVATIONS

        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{source}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"{source}: unsupported activation '{self.activation}'")
        check_rope_type(self.rope_parameters, source, "Gemma")
        if self.use_bidirectional_attention:
            raise ConfigError(f"{source}: use_bidirectional_attention is not supported")
