"""lmtool: convert, inspect and run language-model checkpoints with our own PyTorch forward passes.

    >>> import lmtool
    >>> lm = lmtool.load("google/gemma-2b", dtype="bfloat16")
    >>> logits = lm.model(input_ids)            # [B, T, vocab]
"""

__version__ = "0.1.0"

from .loading import LoadedModel, load  # noqa: E402

__all__ = ["load", "LoadedModel", "__version__"]
