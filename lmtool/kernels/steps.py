"""The per-token elementwise and recurrent steps as single native calls (source: steps.c).

A one-token step of a recurrent layer is a few thousand elements (the Mamba2 state a megabyte
per layer at batch 1); as PyTorch operations it is dozens of small calls, each allocating and
passing over its data, which cost RecurrentGemma-2B and Zamba2-1.2B a sixth to a third of
their decode step. Each function here is one pass and rounds where PyTorch's operations round
(see steps.c), so it stands in for them exactly in bfloat16 and to float32 rounding in float32.

steps.c is plain C compiled into every instruction set's kernel library (lmtool.kernels), so it
runs wherever the linear kernels do, vectorized by the compiler for that instruction set. Callers
check `usable()` and keep PyTorch's operations when it is False: no kernels here (no compiler,
LMTOOL_NATIVE=0), autograd, or tensors it does not take.
"""

from __future__ import annotations

import ctypes

import torch

from . import library as kernels_library
from . import rows_of

MAX_STATE = 512  # largest Mamba2 state size the kernel takes (steps.c MAX_STATE)


def library() -> ctypes.CDLL | None:
    """The active kernel library, if it has the step kernels (every build of this tree does)."""
    lib = kernels_library()
    return lib if lib is not None and hasattr(lib, "lm_ssd_step") else None


def usable(*tensors: torch.Tensor | None) -> bool:
    """CPU tensors of one model dtype (bfloat16 or float32; state tensors may be float32), no
    autograd, and the library built."""
    present = [t for t in tensors if t is not None]
    return (
        present[0].device.type == "cpu"
        and present[0].dtype in (torch.bfloat16, torch.float32)
        and all(t.device.type == "cpu" for t in present)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in present))
        and library() is not None
    )


def conv_step(
    x: torch.Tensor, state: torch.Tensor, weight_kc: torch.Tensor, bias: torch.Tensor | None, silu: bool = False
) -> torch.Tensor:
    """One step of the depthwise causal convolution: x [B,1,C] (rows may be strided), state
    [B,K-1,C] contiguous in x's dtype (shifted in place), weight_kc [K,C] float32, bias [C] in x's
    dtype or None -> [B,1,C] (SiLU applied when silu)."""
    B, _, C = x.shape
    K = weight_kc.shape[0]
    flat, stride = rows_of(x)
    out = torch.empty(B, 1, C, dtype=x.dtype)
    library().lm_conv_step(
        int(x.dtype == torch.bfloat16), flat.data_ptr(), stride, state.data_ptr(), weight_kc.data_ptr(),
        bias.data_ptr() if bias is not None else None, B, K, C, int(silu), out.data_ptr(), C,
    )
    return out


def rglru_step(
    x: torch.Tensor,
    input_gate: torch.Tensor,
    recurrent_gate: torch.Tensor,
    softplus_param: torch.Tensor,
    positions: torch.Tensor | None,
    h: torch.Tensor,
) -> torch.Tensor:
    """One RG-LRU step: x and the two gates before their sigmoid [B,L] (rows may be strided),
    softplus(recurrent_param) [L] in x's dtype, positions [B] or [B,1] int64 (a row at position 0
    starts its sequence: nothing before it carries over) or None, h [B,L] float32 (updated in
    place) -> the new h in x's dtype [B,L]."""
    B, L = h.shape
    xs, x_stride = rows_of(x)
    gi, gi_stride = rows_of(input_gate)
    gr, gr_stride = rows_of(recurrent_gate)
    out = torch.empty(B, L, dtype=x.dtype)
    library().lm_rglru_step(
        int(x.dtype == torch.bfloat16), xs.data_ptr(), x_stride, gi.data_ptr(), gi_stride, gr.data_ptr(), gr_stride,
        softplus_param.data_ptr(), positions.data_ptr() if positions is not None else None,
        positions.stride(0) if positions is not None else 0, h.data_ptr(), B, L,
        out.data_ptr(),
    )
    return out


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
) -> torch.Tensor:
    """One Mamba2 step (lmtool.recurrent.ssd_step's arithmetic): state [b,H,P,N] float32 (updated
    in place), x [b,H*P], dt [b,H] after softplus, B and C [b,G*N] (rows may be strided views of
    one projection), A [H] float32, D [H] or None -> y [b,H,P] in x's dtype."""
    b, H, P, N = state.shape
    G = B.shape[-1] // N
    xs, x_stride = rows_of(x)
    dts, dt_stride = rows_of(dt)
    Bs, b_stride = rows_of(B)
    Cs, c_stride = rows_of(C)
    y = torch.empty(b, H, P, dtype=x.dtype)
    status = library().lm_ssd_step(
        int(x.dtype == torch.bfloat16), state.data_ptr(), xs.data_ptr(), x_stride, dts.data_ptr(), dt_stride,
        A.data_ptr(), Bs.data_ptr(), b_stride, Cs.data_ptr(), c_stride, D.data_ptr() if D is not None else None,
        b, H, G, P, N, y.data_ptr(),
    )
    if status != 0:
        raise ValueError(f"ssd_step: state size {N} above {MAX_STATE}")
    return y


def ssd_scan(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
) -> torch.Tensor:
    """The Mamba2 scan over a prompt (lmtool.recurrent.ssd_chunk_scan's arithmetic, float32
    throughout): state [b,H,P,N] float32 (updated in place), x [b,T,H*P], dt [b,T,H] after softplus
    and clamp, B and C [b,T,G*N] (rows may be strided views of one projection), A [H], D [H] or
    None -> y [b,T,H,P] float32. bfloat16 inputs are widened here, once (a few MB at most)."""
    b, H, P, N = state.shape
    T = x.shape[1]
    G = B.shape[-1] // N
    xs, x_stride = rows_of(x.float())
    dts, dt_stride = rows_of(dt.float())
    Bs, b_stride = rows_of(B.float())
    Cs, c_stride = rows_of(C.float())
    A, D = A.float().contiguous(), D.float().contiguous() if D is not None else None
    y = torch.empty(b, T, H, P, dtype=torch.float32)
    status = library().lm_ssd_scan(
        state.data_ptr(), xs.data_ptr(), x_stride, dts.data_ptr(), dt_stride, A.data_ptr(), Bs.data_ptr(), b_stride,
        Cs.data_ptr(), c_stride, D.data_ptr() if D is not None else None, b, T, H, G, P, N, y.data_ptr(),
    )
    if status == -2:
        raise MemoryError("ssd_scan: out of memory")
    if status != 0:
        raise ValueError(f"ssd_scan: state size {N} or head width {P} above {MAX_STATE}")
    return y


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float, scale_after_cast: bool) -> torch.Tensor:
    """x [..., n] normalized by its root mean square in float32 and multiplied by scale [n] float32:
    rounded once after the product, or (scale_after_cast) rounded before it and after it, as
    lmtool.layers.RMSNorm's two conventions."""
    n = x.shape[-1]
    flat, stride = rows_of(x)
    out = torch.empty(x.shape, dtype=x.dtype)
    library().lm_rms_norm(
        int(x.dtype == torch.bfloat16), flat.data_ptr(), stride, flat.shape[0], n, scale.data_ptr(),
        int(scale_after_cast), eps, out.data_ptr(),
    )
    return out


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """Mamba2's gated norm of y [..., n] by silu(z) over `groups` parts of a row -> [..., n] in
    z's dtype (the model's, as weight's). y in that dtype (a decode step), or float32 (after a
    prefill scan: then, as transformers, nothing is rounded before the weight's product)."""
    n = y.shape[-1]
    ys, y_stride = rows_of(y)
    zs, z_stride = rows_of(z)
    out = torch.empty(y.shape, dtype=z.dtype)
    status = library().lm_gated_rms_norm(
        int(z.dtype == torch.bfloat16), ys.data_ptr(), y_stride, int(y.dtype != z.dtype), zs.data_ptr(), z_stride,
        ys.shape[0], n, groups, weight.data_ptr(), eps, out.data_ptr(),
    )
    if status != 0:
        raise ValueError(f"gated_rms_norm: {n} channels in {groups} groups")
    return out


def soft_cap_(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """logits = tanh(logits / cap) * cap in place (contiguous), rounding as the three PyTorch
    operations do."""
    library().lm_soft_cap(int(logits.dtype == torch.bfloat16), logits.data_ptr(), logits.numel(), cap)
    return logits


def mamba2_step(
    zxbcdt: torch.Tensor,
    conv_state: torch.Tensor,
    conv_weight_kc: torch.Tensor,
    conv_bias: torch.Tensor,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    ssm_state: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_groups: int,
    eps: float,
) -> torch.Tensor:
    """A Mamba2 mixer's decode step between in_proj and out_proj (see steps.c lm_mamba2_step):
    zxbcdt [B,1,d_inner+conv_dim+H] (in_proj's output), conv_state [B,K-1,conv_dim] and ssm_state
    [B,H,P,N] float32 (both updated in place), conv_weight_kc [K,conv_dim] float32, A [H] float32,
    the rest [n] in the model dtype -> the gated norm's output [B,1,d_inner]."""
    B = zxbcdt.shape[0]
    _, H, P, N = ssm_state.shape
    flat, _ = rows_of(zxbcdt)
    out = torch.empty(B, 1, H * P, dtype=zxbcdt.dtype)
    step = bind_mamba2_step(flat, out.view(B, H * P), conv_weight_kc, conv_bias, dt_bias, A, D, norm_weight,
                            norm_groups, eps, H, N)
    step(conv_state.data_ptr(), ssm_state.data_ptr())
    return out


def bind_mamba2_step(
    zxbcdt: torch.Tensor,
    out: torch.Tensor,
    conv_weight_kc: torch.Tensor,
    conv_bias: torch.Tensor,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_groups: int,
    eps: float,
    heads: int,
    state_size: int,
):
    """mamba2_step's call with everything but the two states bound: zxbcdt [B, width] (rows
    strided) and out [B, d_inner] stay where they are; returns step(conv_state, ssm_state), on
    the states' addresses (what a captured decode step calls every token, families/zamba2/decode.py)."""
    B, d_inner = out.shape
    K, conv_dim = conv_weight_kc.shape
    G = (conv_dim - d_inner) // (2 * state_size)
    lm_mamba2_step = library().lm_mamba2_step
    before = (int(zxbcdt.dtype == torch.bfloat16), zxbcdt.data_ptr(), zxbcdt.stride(0), B, d_inner, conv_dim, heads,
              G, d_inner // heads, state_size, K)
    between = (conv_weight_kc.data_ptr(), conv_bias.data_ptr(), dt_bias.data_ptr(), A.data_ptr(), D.data_ptr())
    after = (norm_weight.data_ptr(), norm_groups, eps, out.data_ptr())

    def step(conv_state: int, ssm_state: int) -> None:
        status = lm_mamba2_step(*before, conv_state, *between, ssm_state, *after)
        if status != 0:
            raise ValueError(f"mamba2_step: state size {state_size} above {MAX_STATE}" if status == -1
                             else "mamba2_step: out of memory")

    step.keeps = (zxbcdt, out, conv_weight_kc, conv_bias, dt_bias, A, D, norm_weight)  # the addresses bound above
    return step


def add_layer_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, layer_norm(x + delta, weight, bias, eps)) in one pass, the sum rounded to the
    model dtype before the norm as the two PyTorch operations do; delta None: (x, layer_norm(x)).
    x and delta [..., n] (rows may be strided), weight and bias [n], all in one dtype."""
    n = x.shape[-1]
    xs, x_stride = rows_of(x)
    ds, d_stride = rows_of(delta) if delta is not None else (None, 0)
    out = torch.empty(x.shape, dtype=x.dtype)
    total = torch.empty(x.shape, dtype=x.dtype) if delta is not None else x
    library().lm_add_layer_norm(
        int(x.dtype == torch.bfloat16), xs.data_ptr(), x_stride, ds.data_ptr() if ds is not None else None, d_stride,
        xs.shape[0], n, weight.data_ptr(), bias.data_ptr(), eps, total.data_ptr() if delta is not None else None,
        out.data_ptr(),
    )
    return total, out


def kv_append(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: int) -> None:
    """keys[:, :, position] = k and values[:, :, position] = v in one call: keys and values a KV
    cache's [B,H,max_len,hd] contiguous tensors, k and v [B,H,1,hd] with rows of hd contiguous
    (views of a fused projection's output)."""
    B, H, max_len, hd = keys.shape
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("kv_append: key and value rows must be contiguous")
    library().lm_kv_append(
        int(keys.dtype == torch.bfloat16), k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0),
        v.stride(1), keys.data_ptr(), values.data_ptr(), B, H, max_len, hd, position,
    )


def rope_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """x [B,H,1,hd] (heads of hd contiguous elements; a view of a projection's output) rotated in
    place as lmtool.layers.apply_rotary(x, cos, sin) computes it, cos and sin [B,1,1,d] in x's
    dtype (the first d channels rotated)."""
    B, H, _, hd = x.shape
    d = cos.shape[-1]
    if x.stride(-1) != 1:
        raise ValueError("rope_in_place: head rows must be contiguous")
    cos, sin = cos.reshape(B, d).contiguous(), sin.reshape(B, d).contiguous()
    library().lm_rope(int(x.dtype == torch.bfloat16), x.data_ptr(), x.stride(0), x.stride(1), B, H, d, cos.data_ptr(),
                      sin.data_ptr())
