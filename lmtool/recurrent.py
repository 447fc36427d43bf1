"""Building blocks of recurrent layers, shared by the families that have them.

Both keep their state in a `RecurrentState` of the layer's cache entry and always continue it, so
a prompt processed in several chunks gives the same result as one call (chunked prefill is exact).
A sequence starts wherever its position id is 0 (the first real token, and every left pad): there
the scan forgets its state; the convolution reads zeros for the pads before it. A left-padded row
is then equal to the row alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution over time, continuing from `state`.

    x [B,T,C]; weight [C,K] with weight[:, K-1] applied to the current step; state [B,K-1,C],
    the inputs before x (None: zeros). Returns (y [B,T,C], the new state: the last K-1 inputs).
    Inputs that no output may read (left pads, before a sequence's first token) must be zero:
    the caller zeroes them (`zero_pads`), which is what the authors' per-tap document mask
    amounts to when everything before a sequence is padding.
    """
    B, T, C = x.shape
    K = weight.shape[1]
    if state is None:
        state = x.new_zeros(B, K - 1, C)
    history = torch.cat([state.to(x.dtype), x], dim=1)  # [B, K-1+T, C]
    if T == 1:
        # The decode step as transformers computes it: products, one sum, the bias.
        y = (history * weight.T).sum(1, keepdim=True)
        y = y + bias if bias is not None else y
    else:
        y = F.conv1d(history.transpose(1, 2), weight[:, None, :], bias, groups=C).transpose(1, 2)
    return y, history[:, T:].clone()


def zero_pads(x: torch.Tensor, step) -> torch.Tensor:
    """x [B,T,...] with the positions of left pads zeroed (a no-op without padding)."""
    if not step.has_padding:
        return x
    real = step.key_mask[:, step.start : step.end]
    return x * real.reshape(*real.shape, *([1] * (x.dim() - 2))).to(x.dtype)


def linear_scan(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = a_t * h_{t-1} + x_t over the time axis of a, x [B,T,C], accumulated in float32.

    h0 [B,C] float32 (None: zeros). Returns (h [B,T,C] in x's dtype, h_T in float32).
    One step is a fused multiply-add; longer inputs use a parallel prefix scan (log2 T passes
    over the whole input, no Python loop over positions) that composes the steps with products
    only, so a zero in a (a reset) stays exactly zero.
    """
    dtype = x.dtype
    if x.shape[1] == 1 and h0 is not None:  # the decode step
        last = a[:, 0].float() * h0 + x[:, 0].float()
        return last[:, None].to(dtype), last
    a32, h = a.float(), x.float()
    if h0 is not None:
        h = torch.cat([h[:, :1] + a32[:, :1] * h0[:, None], h[:, 1:]], dim=1)
    T = h.shape[1]
    if T > 1:
        a32 = a32.clone()
        d = 1
        while d < T:
            # After this pass, h_t holds the scan over (t - 2d, t] and a_t the product over it.
            h[:, d:] = h[:, d:] + a32[:, d:] * h[:, :-d]
            if 2 * d < T:
                a32[:, d:] = a32[:, d:] * a32[:, :-d]
            d *= 2
    return h.to(dtype), h[:, -1].clone()
