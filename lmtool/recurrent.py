"""Building blocks of recurrent layers, shared by the families that have them.

Convolutions and scans keep their state in a `RecurrentState` of the layer's cache entry and
always continue it, so a prompt processed in several chunks gives the same result as one call
(chunked prefill is exact). Left pads are zeroed where they would enter (`pad_multiplier`): the
convolution then reads zeros before a row's first token, and a scan whose input is zero there
(Mamba2) or that resets at position 0 (RG-LRU) starts the row from nothing. A left-padded row is
then equal to the row alone.

The one-token steps (convolution, RG-LRU, Mamba2 state update) run as single native calls
(lmtool.kernels.steps) when they can; the PyTorch operations here are their reference and the
path for autograd and other devices.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from .kernels import steps as step_kernels
from .layers import derived


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
    the caller zeroes them (`pad_multiplier`), which is what the authors' per-tap document mask
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


class CausalConv1d(nn.Conv1d):
    """The depthwise causal convolution of a recurrent layer (weight [C,1,K], bias [C]: the
    checkpoints' Conv1d), called with and returning its state as `causal_conv1d`; SiLU after it
    on request, since Mamba2 applies one. The one-token step is one native call."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__(channels, channels, kernel_size=kernel_size, groups=channels, padding=kernel_size - 1)

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None, silu: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        K = self.kernel_size[0]
        if (
            T == 1
            and (state is None or (state.dtype == x.dtype and state.is_contiguous()))
            and all(p is None or p.dtype == x.dtype for p in (self.weight, self.bias))
            and step_kernels.usable(x, self.weight, self.bias)
        ):
            if state is None:
                state = x.new_zeros(B, K - 1, C)
            return step_kernels.conv_step(x, state, self.weight_kc(), self.bias, silu), state
        y, state = causal_conv1d(x, self.weight[:, 0], self.bias, state)
        return (F.silu(y) if silu else y), state

    def weight_kc(self) -> torch.Tensor:
        """The weight as the native step reads it: [K, C] in float32."""
        return derived(self, "_weight_kc", self.weight, lambda w: w[:, 0].T.float().contiguous())


def pad_multiplier(step, dtype: torch.dtype) -> torch.Tensor | None:
    """[B,T,1]: 0 at the left pads among a call's positions, 1 elsewhere; None when the call has
    no pad (every decode step), so the hot path multiplies by nothing."""
    if not step.has_padding:
        return None
    real = step.key_mask[:, step.start : step.end]
    return None if bool(real.all()) else real[..., None].to(dtype)


def linear_scan(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = a_t * h_{t-1} + x_t over the time axis of a, x [B,T,C], accumulated in float32.

    h0 [B,C] float32 (None: zeros). Returns (h [B,T,C] in x's dtype, h_T in float32).
    One step is a fused multiply-add. Longer inputs are cut into about sqrt(T) chunks of about
    sqrt(T) steps: the steps within every chunk run side by side (one loop over a chunk's steps,
    each an operation over all chunks), then the state entering each chunk is carried across
    them (one loop over chunks) and added in, scaled by the product of a since the chunk's start.
    That is about 2 sqrt(T) vector operations instead of T, each over T / sqrt(T) positions, and
    products only: a zero in a (a reset) cuts every later chunk off from what came before.
    """
    dtype = x.dtype
    B, T, C = x.shape
    if T == 1 and h0 is not None:  # the decode step
        last = a[:, 0].float() * h0 + x[:, 0].float()
        return last[:, None].to(dtype), last
    steps = max(1, math.isqrt(T))  # per chunk
    chunks = -(-T // steps)
    pad = chunks * steps - T
    # Padding steps (a = 1, x = 0) keep the state as it was at T, so the last one is h_T.
    a32 = F.pad(a.float(), (0, 0, 0, pad), value=1.0).view(B, chunks, steps, C)
    x32 = F.pad(x.float(), (0, 0, 0, pad)).view(B, chunks, steps, C)
    local = torch.empty_like(x32)  # the scan within each chunk from a zero state
    decay = torch.empty_like(a32)  # product of a from the chunk's start
    h, p = x32[:, :, 0], a32[:, :, 0]
    local[:, :, 0], decay[:, :, 0] = h, p
    for i in range(1, steps):
        h = torch.addcmul(x32[:, :, i], a32[:, :, i], h)
        p = p * a32[:, :, i]
        local[:, :, i], decay[:, :, i] = h, p
    entering = torch.empty(B, chunks, C, dtype=torch.float32, device=x.device)
    state = h0 if h0 is not None else torch.zeros(B, C, dtype=torch.float32, device=x.device)
    for j in range(chunks):
        entering[:, j] = state
        state = torch.addcmul(local[:, j, -1], decay[:, j, -1], state)
    h_all = torch.addcmul(local, decay, entering[:, :, None]).view(B, chunks * steps, C)[:, :T]
    return h_all.to(dtype), state


# --- Mamba2 (SSD) ----------------------------------------------------------------------------


def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """a [..., L] -> [..., L, L] with entry (l, s) = a_{s+1} + ... + a_l for l >= s (0 on the
    diagonal) and -inf above it. A masked cumulative sum, not a difference of cumulative sums
    (which would cancel catastrophically), as transformers and the Mamba2 authors compute it."""
    L = a.shape[-1]
    x = a[..., None].expand(*a.shape, L)  # [..., m, s] = a_m
    below = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), diagonal=-1)
    sums = torch.cumsum(x.masked_fill(~below, 0), dim=-2)
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), diagonal=0)
    return sums.masked_fill(~causal, float("-inf"))


def ssd_kernels_take(x: torch.Tensor, size: int, dt, B, C, D, *others: torch.Tensor | None) -> bool:
    """Whether the native Mamba2 kernels (scan and step) take these tensors: a state size (and head
    width) they hold, dt/B/C/D in x's dtype, and the kernels usable for all of them."""
    return (
        size <= step_kernels.MAX_STATE
        and all(t is None or t.dtype == x.dtype for t in (dt, B, C, D))
        and step_kernels.usable(x, dt, B, C, D, *others)
    )


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Mamba2 scan over a sequence (arguments and results as ssd_chunk_scan's): one native
    call that runs the recurrence position by position with each head's state held in cache
    (kernels/steps.c lm_ssd_scan) when the kernels are built, else ssd_chunk_scan's PyTorch
    operations. Both are float32 throughout and agree to float32 noise."""
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    if ssd_kernels_take(x, max(N, P), dt, B, C, D, A, initial_state):
        if initial_state is None:
            state = torch.zeros(b, H, P, N, dtype=torch.float32, device=x.device)
        else:  # a copy: the caller's state is the one before this call
            state = initial_state.to(torch.float32, copy=True).contiguous()
        y = step_kernels.ssd_scan(state, x.reshape(b, T, H * P), dt, A, B.reshape(b, T, G * N), C.reshape(b, T, G * N), D)
        return y, state
    return ssd_chunk_scan(x, dt, A, B, C, chunk_size, D, initial_state)


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Mamba2 selective state-space scan (SSD) over a sequence, chunk by chunk, in float32.

    Per head h (of H, each P wide) with state S [P,N]:
        S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T,    y_t = S_t C_t + D_h x_t.
    x [b,T,H,P]; dt [b,T,H], the discretisation step (softplus and any clamp already applied);
    A [H] (negative); B, C [b,T,G,N], head h reading group h // (H/G); D [H] or None;
    initial_state [b,H,P,N] (None: zeros), the state carried in from an earlier call.
    Returns (y [b,T,H,P] float32, the final state [b,H,P,N] float32).

    Within a chunk the output is the quadratic ("attention-like") form: C_l . B_s weighted by
    the decay between s and l; across chunks the state is carried by a Python loop over chunks
    (not over positions), so memory is bounded by one chunk. The last chunk may be shorter
    (nothing is padded). The operations are those of transformers' torch fallback, so rounding
    agrees to float32 noise.
    """
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G  # heads per group
    xf = x.float()
    dtf = dt.float()
    Af = A.float()
    xs = (xf * dtf[..., None]).view(b, T, G, R, P)  # the input scaled by dt
    a = (Af * dtf).view(b, T, G, R)  # log-decay per step
    Bf, Cf = B.float(), C.float()
    if initial_state is None:
        state = xf.new_zeros(b, G, R, P, N)
    else:
        state = initial_state.float().reshape(b, G, R, P, N)
    y_all = torch.empty(b, T, G, R, P, dtype=torch.float32, device=x.device)  # written chunk by chunk
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        xs_c, B_c, C_c = xs[:, start:end], Bf[:, start:end], Cf[:, start:end]
        a_c = a[:, start:end].permute(0, 2, 3, 1)  # [b,G,R,l]
        a_cum = torch.cumsum(a_c, dim=-1)
        # 1. Within the chunk: y_l += sum_s (C_l . B_s) exp(a_{s+1} + ... + a_l) xs_s.
        decay = torch.exp(segment_sum(a_c))  # [b,G,R,l,s]
        scores = torch.einsum("blgn,bsgn->bgls", C_c, B_c)[:, :, None] * decay
        y = torch.einsum("bgrls,bsgrp->blgrp", scores, xs_c)
        # 2. From the state at the chunk's start: y_l += (C_l . S) exp(a_1 + ... + a_l).
        from_state = torch.einsum("blgn,bgrpn->blgrp", C_c, state)
        y_all[:, start:end] = y + from_state * torch.exp(a_cum).permute(0, 3, 1, 2)[..., None]
        # 3. The state at the chunk's end.
        to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b,G,R,l]
        B_decay = B_c[:, :, :, None, :] * to_end.permute(0, 3, 1, 2)[..., None]  # [b,l,G,R,N]
        added = torch.einsum("blgrn,blgrp->bgrpn", B_decay, xs_c)
        state = state * torch.exp(a_cum[..., -1])[..., None, None] + added
    y = y_all.view(b, T, H, P)
    if D is not None:
        y.add_(D[:, None] * xf)
    return y.contiguous(), state.reshape(b, H, P, N)


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the same recurrence (decode), with transformers' rounding steps.

    state [b,H,P,N] float32; x [b,H,P]; dt [b,H] (after softplus) and B, C [b,G,N] in the model
    dtype. The decay is exp(dt A) in float32; dt B x is formed in the model dtype and added to the
    float32 state; the output reads the state cast to the model dtype. Returns (y [b,H,P] in x's
    dtype, the new state float32: `state` itself, updated in place).
    """
    b, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    if state.dtype == torch.float32 and state.is_contiguous() and ssd_kernels_take(x, N, dt, B, C, D, A, state):
        y = step_kernels.ssd_step(
            state, x.reshape(b, H * P), dt, A.float().contiguous(), B.reshape(b, G * N), C.reshape(b, G * N), D
        )
        return y, state
    R = H // G
    decay = torch.exp(dt.float() * A.float())  # [b,H]
    B_h = B[:, :, None, :].expand(b, G, R, N).reshape(b, H, 1, N)
    C_h = C[:, :, None, :].expand(b, G, R, N).reshape(b, H, N, 1)
    dBx = (dt[:, :, None, None] * B_h) * x[..., None]  # [b,H,P,N], model dtype
    # In place: the state is a megabyte per layer at batch 1, and a fresh one per step costs
    # more in page faults and passes than the arithmetic.
    state.mul_(decay[..., None, None]).add_(dBx)
    y = torch.matmul(state.to(x.dtype), C_h)[..., 0]  # [b,H,P]
    if D is not None:
        y = (y + x * D[:, None]).to(y.dtype)
    return y.to(x.dtype), state
