"""FlaxBloomModel / FlaxBloomForCausalLM checkpoints (flax_model.msgpack) -> BloomForCausalLM."""

from ...flax_msgpack import FlaxConverter

FLAX = FlaxConverter(name="bloom-flax", model_type="bloom", signature=("transformer", "word_embeddings"))
