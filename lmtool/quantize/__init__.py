"""`lmtool quantize`: weight-only int8 / int4 checkpoints in the compressed-tensors layout.

- schemes: the arithmetic (int8 per row, int4 per group with a clipping search), packing, SNR
- format: the compressed-tensors tensors and config, written and read
- linear: the quantized modules swapped in at load, and the one matmul function
- build: the streaming quantizer that writes an output folder
- verify: source against quantized model on a text (llama.cpp's --kl-divergence statistics)

The value lists below are plain data (no torch import), for the CLI's help and completion.
"""

from ..choices import QUANT_SCHEMES as SCHEMES  # noqa: F401  (the CLI's list, torch-free)

GROUP_SIZES = (32, 64, 128)
HEAD_CHOICES = ("int8", "bf16")
DEFAULT_GROUP_SIZE = 64
# Quality gates (llama.cpp --kl-divergence statistics): fail when the mean KL divergence is above
# the first value or the same-top-1 share (percent) below the second.
DEFAULT_GATES = {"int8": (0.01, 95.0), "int4": (0.1, 85.0), "int4-m": (0.1, 85.0)}
