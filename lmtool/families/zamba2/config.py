from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import ModelConfig, check_rope_type, rope_setting
from ...errors import ConfigError

# A Mamba2 layer is "linear_attention" in transformers 5.23 and "mamba" in older configs (which
# 5.23 remaps); "hybrid" is a shared transformer block followed by a Mamba2 layer.
MAMBA_KINDS = ("mamba", "linear_attention")
BLOCK_KINDS = (*MAMBA_KINDS, "hybrid")


def default_block_types() -> list[str]:
    """transformers' default: 54 layers, hybrid at 6, 12, ..., 42, 47, 51 (Zamba2-2.7B)."""
    mamba = "linear_attention"
    return [mamba] + ([mamba] * 5 + ["hybrid"]) * 7 + [mamba] * 4 + ["hybrid"] + [mamba] * 3 + ["hybrid"] + [mamba] * 2


@dataclass
class Zamba2Config(ModelConfig):
    """Zamba2: Mamba2 layers and shared transformer blocks. Defaults are transformers 5.23's.

    transformers derives attention_hidden_size, attention_head_dim, mamba_headdim,
    hybrid_layer_ids (and the unused kv_channels, num_query_groups) from the other fields, but
    a value present in config.json overrides the derived one (5.23 sets extra keys after
    deriving), so they are optional fields here too: None means derived.
    """

    model_type = "zamba2"
    aliases = {"layer_types": "layers_block_type", "head_dim": "attention_head_dim"}

    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    hidden_size: int = 2560
    num_hidden_layers: int = 54
    layers_block_type: list[str] | None = None  # None: default_block_types()
    mamba_d_state: int = 64
    mamba_d_conv: int = 4
    mamba_expand: int | float = 2
    mamba_ngroups: int = 1
    time_step_min: float = 0.001  # also the lower clamp of dt in multi-token calls
    time_step_max: float = 0.1  # initialisation only
    time_step_floor: float = 1e-4  # initialisation only
    n_mamba_heads: int = 8
    use_mamba_kernels: bool = True  # deprecated in transformers; no effect
    use_conv_bias: bool = True  # ignored by transformers: the conv always has a bias
    chunk_size: int = 256
    use_mem_eff_path: bool = False  # no effect on the math
    add_bias_linear: bool = False  # biases of in_proj, out_proj, gate_up_proj, down_proj
    intermediate_size: int | None = None  # None: 4 * hidden_size
    hidden_act: str = "gelu"
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as query heads
    attention_dropout: float = 0.0
    num_mem_blocks: int = 1
    use_shared_attention_adapter: bool = False
    adapter_rank: int = 128
    use_mem_rope: bool = False
    rope_parameters: dict | None = None
    rope_theta: float | None = None  # legacy top-level key; rope_parameters' wins
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    num_logits_to_keep: int | None = 1
    use_long_context: bool = False  # only sets max_position_embeddings to 16384 (no RoPE change)
    time_step_limit: list[float] | None = None  # legacy; transformers 5.23 ignores it
    # Derived by transformers unless config.json gives them (see above).
    attention_hidden_size: int | None = None
    attention_head_dim: int | None = None
    mamba_headdim: int | None = None
    hybrid_layer_ids: list[int] | None = None
    kv_channels: int | None = None  # unused by the forward pass
    num_query_groups: int | None = None  # unused by the forward pass
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    # --- derived sizes ---------------------------------------------------------------------------
    @property
    def block_types(self) -> list[str]:
        """'mamba' or 'hybrid' for every layer (legacy and new names alike)."""
        raw = self.layers_block_type if self.layers_block_type is not None else default_block_types()
        return ["hybrid" if kind == "hybrid" else "mamba" for kind in raw]

    @property
    def hybrid_ids(self) -> list[int]:
        return [i for i, kind in enumerate(self.block_types) if kind == "hybrid"]

    @property
    def num_shared_blocks(self) -> int:
        """Distinct shared transformer blocks actually stored (never more than hybrid layers)."""
        return min(self.num_mem_blocks, len(self.hybrid_ids))

    @property
    def attention_input_size(self) -> int:
        """The shared attention reads concat(hidden, original embeddings): 2 * hidden_size."""
        return self.attention_hidden_size if self.attention_hidden_size is not None else 2 * self.hidden_size

    @property
    def head_dim(self) -> int:
        if self.attention_head_dim is not None:
            return self.attention_head_dim
        return 2 * self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads if self.num_key_value_heads is not None else self.num_attention_heads

    @property
    def attention_scale(self) -> float:
        """(head_dim / 2) ** -0.5, as transformers (not head_dim ** -0.5)."""
        return (self.head_dim / 2) ** -0.5

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def d_inner(self) -> int:
        return int(self.mamba_expand * self.hidden_size)

    @property
    def mamba_head_dim(self) -> int:
        return self.mamba_headdim if self.mamba_headdim is not None else self.d_inner // self.n_mamba_heads

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: x, B and C (d_inner + 2 * groups * state)."""
        return self.d_inner + 2 * self.mamba_ngroups * self.mamba_d_state

    @property
    def rope_base(self) -> float:
        return rope_setting(self.rope_parameters, "rope_theta", self.rope_theta, 10000.0)

    @property
    def max_positions(self) -> int:
        return 16384 if self.use_long_context else self.max_position_embeddings

    # --- decoding state ---------------------------------------------------------------------------
    def state_bytes(self) -> dict[str, int]:
        """Per sequence: every layer's Mamba2 mixer keeps the last d_conv - 1 conv inputs (model
        dtype) and an SSM state of heads x head_dim x d_state (float32), whatever the length;
        every hybrid layer keeps its own keys and values, which grow with the length."""
        dtype_bytes = self.dtype_bytes
        mixer = (self.mamba_d_conv - 1) * self.conv_dim * dtype_bytes
        mixer += self.n_mamba_heads * self.mamba_head_dim * self.mamba_d_state * 4
        kv = 2 * self.kv_heads * self.head_dim * dtype_bytes
        return {"recurrent": self.num_hidden_layers * mixer, "kv_per_token": len(self.hybrid_ids) * kv}

    def structure(self) -> dict[str, Any]:
        kinds, hybrid = self.block_types, self.hybrid_ids
        state = self.state_bytes()
        adapters = "MLP" + (" and q/k/v" if self.use_shared_attention_adapter else "")
        rope = f"RoPE theta {self.rope_base:g}" if self.use_mem_rope else "no position encoding"
        return {
            "layer pattern": f"{kinds.count('mamba')} mamba, {len(hybrid)} hybrid "
            f"(shared block, then mamba) at layers {hybrid}",
            "shared blocks": f"{self.num_shared_blocks} shared transformer block(s) for {len(hybrid)} hybrid layers "
            f"(invocation j uses block j % {self.num_mem_blocks}), rank-{self.adapter_rank} adapters per "
            f"invocation on {adapters}",
            "attention": f"{self.num_attention_heads} query / {self.kv_heads} key-value heads of {self.head_dim} "
            f"over concat(hidden, embeddings) ({self.attention_input_size}), {rope}",
            "mamba2": f"d_inner {self.d_inner}: {self.n_mamba_heads} heads of {self.mamba_head_dim}, "
            f"{self.mamba_ngroups} group(s), state {self.mamba_d_state}, conv {self.mamba_d_conv}, "
            f"chunk {self.chunk_size}",
            "recurrent state per sequence": state["recurrent"],
            "KV state per token": state["kv_per_token"],
            "decoding state": f"constant recurrent state (conv + SSM of {len(kinds)} mixers) + KV of "
            f"{len(hybrid)} hybrid layers that grows with the length",
            "decoding state dtype": f"{self.dtype or 'float32'} (SSM state float32)",
        }

    # --- validation -------------------------------------------------------------------------------
    def validate(self, source: str) -> None:
        super().validate(source)
        from ...layers import ACTIVATIONS

        for name in (
            "num_attention_heads", "n_mamba_heads", "mamba_d_state", "mamba_d_conv", "mamba_ngroups",
            "chunk_size", "num_mem_blocks", "adapter_rank", "mamba_expand",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{source}: '{name}' must be positive, got {getattr(self, name)}")
        for name in ("intermediate_size", "num_key_value_heads", "attention_head_dim", "mamba_headdim"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{source}: '{name}' must be positive, got {value}")
        if self.layers_block_type is not None:
            unknown = sorted({k for k in self.layers_block_type if k not in BLOCK_KINDS})
            if unknown:
                raise ConfigError(
                    f"{source}: 'layers_block_type' entries must be 'mamba' (or 'linear_attention') or "
                    f"'hybrid', got {unknown}"
                )
        if len(self.block_types) != self.num_hidden_layers:
            raise ConfigError(
                f"{source}: 'num_hidden_layers' ({self.num_hidden_layers}) must equal the length of "
                f"'layers_block_type' ({len(self.block_types)})"
            )
        if self.hybrid_layer_ids is not None and list(self.hybrid_layer_ids) != self.hybrid_ids:
            raise ConfigError(
                f"{source}: 'hybrid_layer_ids' {list(self.hybrid_layer_ids)} disagrees with the hybrid "
                f"layers of 'layers_block_type' {self.hybrid_ids}"
            )
        if self.attention_input_size != 2 * self.hidden_size:
            raise ConfigError(
                f"{source}: 'attention_hidden_size' ({self.attention_input_size}) must be 2 * hidden_size "
                f"({2 * self.hidden_size}): the attention reads concat(hidden, embeddings)"
            )
        if self.mamba_expand * self.hidden_size != self.d_inner:
            raise ConfigError(
                f"{source}: 'mamba_expand' ({self.mamba_expand}) times hidden_size must be a whole number"
            )
        if self.n_mamba_heads * self.mamba_head_dim != self.d_inner:
            raise ConfigError(
                f"{source}: 'n_mamba_heads' ({self.n_mamba_heads}) x mamba head dim ({self.mamba_head_dim}) "
                f"must equal mamba_expand * hidden_size ({self.d_inner})"
            )
        if self.n_mamba_heads % self.mamba_ngroups:
            raise ConfigError(
                f"{source}: 'n_mamba_heads' ({self.n_mamba_heads}) must be a multiple of "
                f"'mamba_ngroups' ({self.mamba_ngroups})"
            )
        if self.head_dim <= 0:
            raise ConfigError(
                f"{source}: 'num_attention_heads' ({self.num_attention_heads}) leaves no attention head "
                f"dimension (2 * hidden_size / heads = {self.head_dim})"
            )
        if self.num_attention_heads % self.kv_heads:
            raise ConfigError(
                f"{source}: 'num_attention_heads' ({self.num_attention_heads}) must be a multiple of "
                f"'num_key_value_heads' ({self.kv_heads})"
            )
        if self.use_shared_attention_adapter and (
            self.num_attention_heads * self.head_dim != self.attention_input_size
            or self.kv_heads != self.num_attention_heads
        ):
            raise ConfigError(
                f"{source}: 'use_shared_attention_adapter' needs num_attention_heads x head_dim = 2 * hidden_size "
                f"and num_key_value_heads = num_attention_heads (the adapters are {self.attention_input_size} wide)"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"{source}: unsupported hidden_act '{self.hidden_act}'")
        if self.time_step_min < 0:
            raise ConfigError(f"{source}: 'time_step_min' must not be negative, got {self.time_step_min}")
        if self.use_mem_rope:
            if self.head_dim % 2:
                raise ConfigError(f"{source}: RoPE needs an even head dimension, got {self.head_dim}")
            check_rope_type(self.rope_parameters, source, "Zamba2")
