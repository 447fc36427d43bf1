from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import ModelConfig, check_rope_type, rope_setting
from ...errors import ConfigError

BLOCK_TYPES = ("recurrent", "attention")


@dataclass
class RecurrentGemmaConfig(ModelConfig):
    """RecurrentGemma (Griffin). Defaults are transformers' RecurrentGemmaConfig; note that its
    intermediate_size is twice the MLP width (the MLP uses intermediate_size // 2)."""

    model_type = "recurrent_gemma"
    # The hub's config.json says "_block_types" (transformers ignores it; its default is the same).
    aliases = {"_block_types": "block_types", "sliding_window": "attention_window_size"}

    vocab_size: int = 256000
    hidden_size: int = 2560
    intermediate_size: int = 3 * 2560
    num_hidden_layers: int = 26
    num_attention_heads: int = 10
    num_key_value_heads: int | None = None  # None: as many as query heads
    lru_width: int | None = None  # None: hidden_size
    attention_window_size: int = 2048
    conv1d_width: int = 4
    logits_soft_cap: float | None = 30.0
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    rope_theta: float | None = None  # legacy key; rope_parameters["rope_theta"] wins
    partial_rotary_factor: float | None = None  # legacy key; rope_parameters' wins
    rope_parameters: dict | None = None
    block_types: list[str] | None = None  # cycled over the layers; None: recurrent, recurrent, attention
    attention_bias: bool = False
    attention_dropout: float = 0.0
    w_init_variance_scale: float = 0.01
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> "RecurrentGemmaConfig":
        # transformers recomputes head_dim (hidden / heads) whatever the file says: drop the key so
        # it is not written back as if it meant something.
        if isinstance(data, dict) and "head_dim" in data:
            data = {k: v for k, v in data.items() if k != "head_dim"}
        return super().from_dict(data, source)

    # --- derived sizes ---------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads if self.num_key_value_heads is not None else self.num_attention_heads

    @property
    def recurrent_width(self) -> int:
        return self.lru_width if self.lru_width is not None else self.hidden_size

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size // 2

    @property
    def rope_base(self) -> float:
        return rope_setting(self.rope_parameters, "rope_theta", self.rope_theta, 10000.0)

    @property
    def rotary_fraction(self) -> float:
        return rope_setting(self.rope_parameters, "partial_rotary_factor", self.partial_rotary_factor, 0.5)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)

    @property
    def layer_types(self) -> list[str]:
        """'recurrent' or 'attention' for every layer: block_types cycled."""
        pattern = list(self.block_types or ("recurrent", "recurrent", "attention"))
        return [pattern[i % len(pattern)] for i in range(self.num_hidden_layers)]

    @property
    def soft_cap(self) -> float | None:
        # The authors' model skips the cap when it is 0 (transformers would divide by zero).
        return self.logits_soft_cap or None

    def state_bytes(self) -> dict[str, int]:
        """Decoding state of one sequence, whatever its length: a ring of window + 1 keys and
        values per attention layer; conv inputs (model dtype) and the scan state (float32) per
        recurrent layer."""
        dtype_bytes = self.dtype_bytes
        kinds = self.layer_types
        ring = 2 * (self.attention_window_size + 1) * self.kv_heads * self.head_dim * dtype_bytes
        recurrent = (self.conv1d_width - 1) * self.recurrent_width * dtype_bytes + self.recurrent_width * 4
        return {
            "attention": kinds.count("attention") * ring,
            "recurrent": kinds.count("recurrent") * recurrent,
        }

    def structure(self) -> dict[str, Any]:
        kinds = self.layer_types
        pattern = list(self.block_types or ("recurrent", "recurrent", "attention"))
        state = self.state_bytes()
        return {
            "block pattern": f"{', '.join(pattern)} (cycled: {kinds.count('recurrent')} recurrent, "
            f"{kinds.count('attention')} attention layers)",
            "attention": f"local, window {self.attention_window_size} (+ the token itself), "
            f"{self.num_attention_heads} query / {self.kv_heads} key-value heads of {self.head_dim}",
            "recurrence": f"RG-LRU width {self.recurrent_width} in {self.num_attention_heads} gate blocks, "
            f"conv width {self.conv1d_width}",
            "decoding state per sequence": state["attention"] + state["recurrent"],
            "decoding state dtype": self.dtype or "float32",
        }

    def validate(self, source: str) -> None:
        super().validate(source)
        from ...layers import ACTIVATIONS

        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{source}: hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.kv_heads})"
            )
        if self.recurrent_width % self.num_attention_heads:
            raise ConfigError(
                f"{source}: lru_width ({self.recurrent_width}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads}), the number of RG-LRU gate blocks"
            )
        if self.block_types is not None:
            unknown = [t for t in self.block_types if t not in BLOCK_TYPES]
            if unknown or not self.block_types:
                raise ConfigError(f"{source}: 'block_types' must list 'recurrent'/'attention', got {self.block_types}")
        for name in ("attention_window_size", "conv1d_width"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{source}: '{name}' must be positive, got {getattr(self, name)}")
        if self.rotary_dim % 2 or not 0 < self.rotary_fraction <= 1:
            raise ConfigError(
                f"{source}: partial_rotary_factor {self.rotary_fraction} gives {self.rotary_dim} rotary "
                f"dimensions of head_dim {self.head_dim}; it must be an even number"
            )
        if self.hidden_activation not in ACTIVATIONS:
            raise ConfigError(f"{source}: unsupported hidden_activation '{self.hidden_activation}'")
        check_rope_type(self.rope_parameters, source, "RecurrentGemma")
