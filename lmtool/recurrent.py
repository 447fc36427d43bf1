"""Building blocks of recurrent layers, shared by the families that have them.

Both keep their state in a `RecurrentState` of the layer's cache entry and always continue it, so
a prompt processed in several chunks gives the same result as one call (chunked prefill is exact).
A sequence starts wherever its position id is 0 (the first real token, and every left pad): there
the scan forgets its state and the convolution reads no earlier input, which makes a left-padded
row equal to the row alone.
"""

from __future__ import annotations

import torch


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    positions: torch.Tensor,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution over time, continuing from `state`.

    x [B,T,C]; weight [C,K] with weight[:, K-1] applied to the current step; positions [B,T]
    (tap s of step t is used only when s <= positions[t], i.e. within the step's own sequence);
    state [B,K-1,C], the inputs before x (None: zeros). Returns (y [B,T,C], the new state).
    Accumulates in x's dtype, tap by tap from the current step back, then adds the bias (the
    order of the authors' reference).
    """
    B, T, C = x.shape
    K = weight.shape[1]
    if state is None:
        state = x.new_zeros(B, K - 1, C)
    history = torch.cat([state.to(x.dtype), x], dim=1)  # [B, K-1+T, C]
    # Positions >= K-1 everywhere (the usual case after the first few tokens): no tap is cut.
    cut = bool((positions < K - 1).any())
    y = None
    for s in range(K):
        tap = history[:, K - 1 - s : K - 1 - s + T] * weight[:, K - 1 - s]
        if cut and s:
            tap = tap * (positions >= s)[..., None].to(x.dtype)
        y = tap if y is None else y + tap
    if bias is not None:
        y = y + bias
    return y, history[:, T:].clone() if K > 1 else history[:, :0]


def linear_scan(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = a_t * h_{t-1} + x_t over the time axis of a, x [B,T,C], accumulated in float32.

    h0 [B,C] float32 (None: zeros). Returns (h [B,T,C] in x's dtype, h_T in float32).
    One step is a fused multiply-add; longer inputs use a parallel prefix scan (log2 T passes
    over the whole input, no Python loop over positions) that composes the steps with products
    only, so a zero in a (a reset) stays exactly zero.
    """
    dtype = x.dtype
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
