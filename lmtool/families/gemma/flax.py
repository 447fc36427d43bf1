"""FlaxGemmaModel / FlaxGemmaForCausalLM checkpoints (flax_model.msgpack) -> GemmaForCausalLM."""

from ...flax_msgpack import FlaxConverter

FLAX = FlaxConverter(name="gemma-flax", model_type="gemma", signature=("model", "embed_tokens"))
