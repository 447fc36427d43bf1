"""lmtool: convert, inspect and run language-model checkpoints with our own PyTorch forward passes.

    >>> import lmtool
    >>> lm = lmtool.load("google/gemma-2b", dtype="bfloat16")
    >>> logits = lm.model(input_ids)            # [B, T, vocab]
"""

__version__ = "0.1.0"

__all__ = ["load", "LoadedModel", "__version__"]


def __getattr__(name: str):
    # Loading needs torch; import it on first use so that `lmtool --help`, completion and the
    # torch-free modules (choices, hub, recipes) start without it.
    if name in ("load", "LoadedModel"):
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'lmtool' has no attribute '{name}'")
