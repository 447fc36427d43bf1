from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import ModelConfig
from ...errors import ConfigError


@dataclass
class BloomConfig(ModelConfig):
    """BLOOM. Field names and defaults are transformers' BloomConfig (n_layer, n_head, ...)."""

    model_type = "bloom"
    aliases = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}

    vocab_size: int = 250880
    hidden_size: int = 64
    n_layer: int = 2
    n_head: int = 8
    layer_norm_epsilon: float = 1e-5
    apply_residual_connection_post_layernorm: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    pretraining_tp: int = 1
    slow_but_exact: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> "BloomConfig":
        # The legacy key n_embed overrides hidden_size, as in transformers (not just a fallback).
        if isinstance(data, dict) and "n_embed" in data:
            data = {k: v for k, v in data.items() if k != "n_embed"} | {"hidden_size": data["n_embed"]}
        return super().from_dict(data, source)

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    @property
    def tp_slices(self) -> int:
        """Number of slices the dense layers are summed over (1 = a plain matmul)."""
        return self.pretraining_tp if self.slow_but_exact and self.pretraining_tp > 1 else 1

    def validate(self, source: str) -> None:
        super().validate(source)
        if self.n_head <= 0:
            raise ConfigError(f"{source}: 'n_head' must be positive, got {self.n_head}")
        if self.hidden_size % self.n_head:
            raise ConfigError(
                f"{source}: hidden_size ({self.hidden_size}) must be a multiple of n_head ({self.n_head})"
            )
        if self.pretraining_tp <= 0:
            raise ConfigError(f"{source}: 'pretraining_tp' must be positive, got {self.pretraining_tp}")
