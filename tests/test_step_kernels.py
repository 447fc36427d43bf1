"""The recurrent decode-step kernels (lmtool/kernels/steps.c) against the PyTorch operations they
stand in for: bit for bit in bfloat16 (but for an ulp of exp/sqrt before a rounding, on a few
elements at most), to float32 rounding in float32, on odd shapes, strided rows, several rows and
sequence starts; on every instruction set this CPU runs (a subprocess per lower one)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmtool import kernels
from lmtool.kernels import steps
from lmtool.recurrent import causal_conv1d, linear_scan, ssd_chunk_scan, ssd_scan

from helpers import other_instruction_sets, rerun_tests_on_instruction_set

pytestmark = pytest.mark.skipif(steps.library() is None, reason="no C compiler for the step kernels")

DTYPES = [torch.float32, torch.bfloat16]


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """float32: rounding apart. bfloat16: equal but on at most 1 % of the elements, and there by
    at most two bfloat16 steps (exp, sqrt or a float32 sum's order may differ from PyTorch's by an
    ulp before a rounding, and a product of two rounded values can carry that to two steps)."""
    got, want = got.float(), want.float()
    if dtype == torch.float32:
        assert (got - want).abs().max() <= 1e-5 * (1 + want.abs().max())
        return
    differ = got != want
    assert differ.float().mean() <= 0.01, f"{int(differ.sum())} of {got.numel()} differ"
    if differ.any():
        step = want[differ].abs() * 2**-7
        assert ((got - want)[differ].abs() <= 2 * step * 1.01).all()


def strided(rows: int, width: int, dtype: torch.dtype, pad: int = 5) -> torch.Tensor:
    """[rows, width] rows of a wider buffer: the kernels read views of fused projections."""
    return torch.randn(rows, width + pad, dtype=dtype)[:, pad:]


def ssd_reference(state, x, dt, A, B, C, D):
    """transformers' decode step written out (Zamba2MambaMixer.torch_forward), model-dtype rounding."""
    b, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    group = torch.arange(H) // (H // G)
    decay = torch.exp(dt.float() * A)[..., None, None]
    dBx = (dt[:, :, None, None] * B[:, group][:, :, None]) * x[..., None]
    state = state * decay + dBx
    y = torch.matmul(state.to(x.dtype), C[:, group][..., None])[..., 0]
    return (y + x * D[:, None]).to(x.dtype), state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,H,G,P,N", [(1, 4, 1, 8, 16), (3, 6, 2, 5, 19), (2, 8, 4, 3, 64)])
def test_ssd_step_kernel_matches_the_reference(dtype, b, H, G, P, N):
    torch.manual_seed(b * 100 + N)
    state = torch.randn(b, H, P, N)
    proj = strided(b, H * P + 2 * G * N + H, dtype)  # x, B, C, dt side by side, as Zamba2's projection
    x, Bm, Cm, dt_raw = proj.split([H * P, G * N, G * N, H], dim=-1)
    dt = F.softplus(dt_raw)
    A, D = -torch.rand(H) * 2, torch.randn(H, dtype=dtype)
    want_y, want_state = ssd_reference(state, x.reshape(b, H, P), dt, A, Bm.reshape(b, G, N), Cm.reshape(b, G, N), D)
    got_state = state.clone()
    got_y = steps.ssd_step(got_state, x, dt, A, Bm, Cm, D)
    assert_close(got_y, want_y, dtype)
    assert (got_state - want_state).abs().max() <= 1e-5 * want_state.abs().max()


def scan_reference(state, x, dt, A, B, C, D):
    """The Mamba2 recurrence position by position in float64: y [b,T,H,P], final state."""
    b, T, H, P = x.shape
    G = B.shape[2]
    group = torch.arange(H) // (H // G)
    x, dt, B, C, D = (t.double() for t in (x, dt, B, C, D))
    state = state.double()
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A.double())[..., None, None]
        state = state * decay + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, group][:, :, None]
        ys.append(torch.matmul(state, C[:, t, group][..., None])[..., 0] + D[:, None] * x[:, t])
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,T,H,G,P,N,start", [(1, 1, 4, 1, 8, 16, False), (3, 37, 6, 2, 5, 19, True), (2, 130, 8, 4, 3, 64, True)])
def test_ssd_scan_kernel_matches_the_recurrence_and_the_chunked_scan(dtype, b, T, H, G, P, N, start, monkeypatch):
    """The prefill scan, float32 throughout, against the recurrence in float64 and against
    ssd_chunk_scan (its PyTorch fallback); rows strided as views of one projection, with and without
    a state carried in; the state given is left as it was."""
    torch.manual_seed(T * 10 + N)
    proj = strided(b * T, H * P + 2 * G * N + H, dtype).view(b, T, -1)
    x, Bm, Cm, dt_raw = proj.split([H * P, G * N, G * N, H], dim=-1)
    dt = F.softplus(dt_raw.float()).to(dtype)
    A, D = -torch.rand(H) * 2, torch.randn(H, dtype=dtype)
    initial = torch.randn(b, H, P, N) if start else None
    given = initial.clone() if start else None
    args = (x.reshape(b, T, H, P), dt, A, Bm.reshape(b, T, G, N), Cm.reshape(b, T, G, N), 16, D, initial)
    want_y, want_state = scan_reference(initial if start else torch.zeros(b, H, P, N), *args[:5], D)
    native = steps.ssd_scan
    calls = []
    monkeypatch.setattr(steps, "ssd_scan", lambda *a: calls.append(1) or native(*a))
    got_y, got_state = ssd_scan(*args)
    assert calls, "the native scan was not taken"
    chunked_y, chunked_state = ssd_chunk_scan(*args)
    assert got_y.dtype == got_state.dtype == torch.float32
    for y, state in ((got_y, got_state), (chunked_y, chunked_state)):
        assert (y.double() - want_y).abs().max() <= 1e-5 * (1 + want_y.abs().max())
        assert (state.double() - want_state).abs().max() <= 1e-5 * (1 + want_state.abs().max())
    if start:
        assert torch.equal(initial, given)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K,C,silu", [(1, 4, 37, False), (3, 4, 300, True), (2, 2, 5, True), (2, 1, 9, False)])
def test_conv_step_kernel_matches_the_reference_and_shifts_its_state(dtype, B, K, C, silu):
    torch.manual_seed(K * C)
    x = strided(B, C, dtype)[:, None]  # [B,1,C], rows strided
    state = torch.randn(B, K - 1, C, dtype=dtype)
    weight, bias = torch.randn(C, K, dtype=dtype), torch.randn(C, dtype=dtype)
    want, want_state = causal_conv1d(x, weight, bias, state.clone())
    want = F.silu(want) if silu else want
    got = steps.conv_step(x, state, weight.T.float().contiguous(), bias, silu)
    assert_close(got, want, dtype)
    assert torch.equal(state, want_state)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L", [(1, 29), (4, 300)])
def test_rglru_step_kernel_matches_the_reference_and_resets_at_position_0(dtype, B, L):
    torch.manual_seed(L)
    x, gate_i, gate_r = strided(B, L, dtype), strided(B, L, dtype, pad=3), strided(B, L, dtype, pad=7)
    param, h0 = torch.randn(L, dtype=dtype), torch.randn(B, L)
    positions = torch.arange(B)[:, None] * 3  # row 0 starts its sequence here
    # RecurrentGemma's RG-LRU (transformers' operations, model dtype)
    log_a = -8.0 * torch.sigmoid(gate_r) * F.softplus(param)
    a, multiplier = torch.exp(log_a), torch.sqrt(1 - torch.exp(2 * log_a))
    start = positions == 0
    a, multiplier = a.masked_fill(start, 0.0), multiplier.masked_fill(start, 1.0)
    want, want_h = linear_scan(a[:, None], (x * torch.sigmoid(gate_i) * multiplier)[:, None], h0.clone())
    h = h0.clone()
    got = steps.rglru_step(x, gate_i, gate_r, F.softplus(param), positions, h)
    assert_close(got, want[:, 0], dtype)
    assert (h - want_h).abs().max() <= 1e-5 * (1 + want_h.abs().max())
    # A start keeps nothing of h0: another h0 gives the same row 0.
    other = torch.randn(B, L)
    again = steps.rglru_step(x, gate_i, gate_r, F.softplus(param), positions, other)
    assert torch.equal(again[0], got[0]) and torch.equal(other[0], h[0])


@pytest.mark.parametrize("isa", other_instruction_sets())
def test_every_other_instruction_set_this_cpu_runs_matches_too(isa):
    """The same tests on the other instruction sets' builds (steps.c is compiled into each)."""
    rerun_tests_on_instruction_set(__file__, isa)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unit_offset,weight_before_cast", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("shape", [(1, 1, 37), (3, 5, 300)])
def test_rms_norm_kernel_matches_the_operations_it_replaces(dtype, unit_offset, weight_before_cast, shape):
    from lmtool.layers import RMSNorm

    torch.manual_seed(shape[-1])
    norm = RMSNorm(shape[-1], 1e-6, unit_offset=unit_offset, weight_before_cast=weight_before_cast).to(dtype)
    norm.weight.data.normal_()
    x = strided(shape[0] * shape[1], shape[-1], dtype).view(*shape[:-1], -1) if shape[1] == 1 else torch.randn(shape, dtype=dtype)
    for _ in range(2):  # the second time after changing the weight in place: the kernel sees the change
        with torch.no_grad():
            got = norm(x)  # the kernel (no autograd)
        want = norm(x)  # the operations (the weight requires grad)
        assert want.requires_grad and not got.requires_grad
        assert_close(got, want.detach(), dtype)
        with torch.no_grad():
            norm.weight.mul_(-2.0)  # as load_state_dict or an optimizer step changes it


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unit_offset,weight_before_cast", [(True, True), (False, False)])
@pytest.mark.parametrize("rows,n", [(1, 37), (3, 300)])
def test_residual_add_in_the_norms_call_is_the_add_then_the_norm(dtype, unit_offset, weight_before_cast, rows, n):
    """A decode plan's norm that makes the residual add before it (lm_add_rms_norm): the sum
    written where asked (x itself, or another buffer with x left as it was), rounded as PyTorch's
    add, and the norm of it, bit for bit what the add and the norm kernel give; x rows strided."""
    from lmtool.captured import RMSNormCall
    from lmtool.layers import RMSNorm

    torch.manual_seed(n)
    norm = RMSNorm(n, 1e-6, unit_offset=unit_offset, weight_before_cast=weight_before_cast).to(dtype)
    norm.weight.data.normal_()
    x, delta = strided(rows, n, dtype), torch.randn(rows, n, dtype=dtype) * 3
    want_sum = x + delta
    with torch.no_grad():
        want = norm(want_sum)
    before, total, out = x.clone(), torch.empty(rows, n, dtype=dtype), torch.empty(rows, n, dtype=dtype)
    RMSNormCall(norm).bound(x, out, delta=delta, total=total)()  # the sum into another buffer
    assert torch.equal(total, want_sum) and torch.equal(out, want) and torch.equal(x, before)
    residual, out = x.contiguous(), torch.empty(rows, n, dtype=dtype)
    RMSNormCall(norm).bound(residual, out, delta=delta)()  # the residual stream updated in place
    assert torch.equal(residual, want_sum) and torch.equal(out, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("y_float32", [False, True])
@pytest.mark.parametrize("rows,n,groups", [(1, 48, 1), (3, 60, 4), (300, 1000, 2)])
def test_gated_rms_norm_kernel_matches_the_operations_it_replaces(dtype, y_float32, rows, n, groups):
    """y in the model dtype (decode) or float32 (after a prefill scan), cast as the mixer casts."""
    from lmtool.families.zamba2.model import GatedRMSNorm

    torch.manual_seed(n)
    norm = GatedRMSNorm(n, groups).to(dtype)
    norm.weight.data.normal_()
    y, z = strided(rows, n, torch.float32 if y_float32 else dtype), strided(rows, n, dtype, pad=2)
    with torch.no_grad():
        got = norm(y, z).to(dtype)
    want = norm(y, z).to(dtype)
    assert want.requires_grad and not got.requires_grad
    assert_close(got, want.detach(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_cap_kernel_matches_the_operations_it_replaces(dtype):
    torch.manual_seed(1)
    # large logits (saturating), small ones (the series near 0), and exact zeros
    logits = torch.cat([torch.randn(3, 4001) * 80, torch.randn(3, 999) * 0.5, torch.zeros(3, 7)], dim=1).to(dtype)
    want = torch.tanh(logits / 30.0) * 30.0
    got = steps.soft_cap_(logits.clone(), 30.0)
    assert_close(got, want, dtype)
    assert (got.abs() <= 30.0).all() and torch.equal(got[:, -7:], want[:, -7:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,groups", [(1, 1), (3, 2)])
def test_mamba2_step_kernel_matches_the_mixers_operations(dtype, batch, groups):
    """A Mamba2 mixer's decode step as one native call against the same mixer's PyTorch
    operations (autograd on, which keeps them), from the same prefilled state."""
    from lmtool.families.zamba2.config import Zamba2Config
    from lmtool.families.zamba2.model import Mamba2Mixer
    from lmtool.cache import RecurrentState

    torch.manual_seed(batch)
    config = Zamba2Config.from_dict(dict(
        model_type="zamba2", hidden_size=24, n_mamba_heads=6, mamba_ngroups=groups, mamba_d_state=10,
        mamba_expand=2, mamba_d_conv=4, chunk_size=4, num_hidden_layers=1, layers_block_type=["mamba"],
        vocab_size=50, num_attention_heads=4,
    ))
    mixer = Mamba2Mixer(config)
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0, 0.3)
        mixer.dt_bias.copy_(torch.linspace(-2, 0.5, mixer.dt_bias.numel()))
        mixer.norm.weight.add_(1.0)
    mixer = mixer.to(dtype)
    prompt, step = torch.randn(batch, 7, 24, dtype=dtype), torch.randn(batch, 1, 24, dtype=dtype)
    native, reference = RecurrentState(), RecurrentState()
    with torch.no_grad():
        mixer(prompt, native, None)
    reference.tensors = {k: v.clone() for k, v in native.tensors.items()}
    calls = []
    original = steps.mamba2_step
    steps.mamba2_step = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.no_grad():
            got = mixer(step, native, None)
    finally:
        steps.mamba2_step = original
    want = mixer(step, reference, None)  # autograd on: the operations
    assert calls and want.requires_grad
    assert_close(got, want.detach(), dtype)
    for name in ("conv", "ssm"):
        assert_close(native.get(name), reference.get(name).detach(), native.get(name).dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n,with_delta", [(1, 37, True), (3, 300, True), (2, 1024, False), (700, 400, True)])
def test_add_layer_norm_kernel_matches_the_operations_it_replaces(dtype, rows, n, with_delta):
    torch.manual_seed(rows + n)
    norm = torch.nn.LayerNorm(n, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1, 0.5), norm.bias.normal_(0, 0.5)
    x = strided(rows, n, dtype) * 3 + 1  # an offset mean: the variance must not cancel it away
    delta = strided(rows, n, dtype) if with_delta else None
    with torch.no_grad():
        want_sum = x + delta if with_delta else x
        want = norm(want_sum)
        got_sum, got = steps.add_layer_norm(x, delta, norm.weight, norm.bias, norm.eps)
    assert torch.equal(got_sum, want_sum)  # the residual add: bit for bit
    if dtype == torch.float32:
        assert_close(got, want, dtype)
        return
    # The moments may differ from PyTorch's by an ulp; where the bias cancels the normalized
    # value, that shows as a large relative but tiny absolute difference: a bfloat16 step of the
    # terms' size, on a few elements.
    differ = got != want
    assert differ.float().mean() <= 0.001, f"{int(differ.sum())} of {got.numel()} differ"
    size = want.float().abs() + norm.bias.float().abs()
    assert ((got.float() - want.float()).abs() <= 2**-7 * size * 1.01).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_append_kernel_writes_what_the_indexed_assignment_does(dtype):
    B, H, hd, max_len = 2, 3, 5, 7
    fused = torch.randn(B, 1, H, 3, hd, dtype=dtype)  # BLOOM's QKV output: keys and values strided views
    k, v = (fused[..., i, :].transpose(1, 2) for i in (1, 2))
    keys, values = torch.randn(B, H, max_len, hd, dtype=dtype), torch.randn(B, H, max_len, hd, dtype=dtype)
    want_keys, want_values = keys.clone(), values.clone()
    want_keys[:, :, 4:5], want_values[:, :, 4:5] = k, v
    steps.kv_append(keys, values, k, v, 4)
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hd,rotated", [(8, 8), (12, 12), (16, 6)])
def test_rope_kernel_rotates_in_place_as_apply_rotary_does(dtype, hd, rotated):
    """lm_rope on the queries of a fused q/k/v output (strided heads), two rows at different
    positions (left padding), whole and partial rotation: bit for bit apply_rotary's result, and the
    keys beside them untouched."""
    from lmtool.layers import RotaryEmbedding, apply_rotary

    B, H, KV = 2, 3, 1
    fused = torch.randn(B, 1, (H + 2 * KV) * hd).to(dtype)
    q = fused[..., : H * hd].view(B, 1, H, hd).transpose(1, 2)
    cos, sin = RotaryEmbedding(rotated)(torch.tensor([[5], [17]]), dtype)
    want = apply_rotary(q, cos, sin)
    rest = fused[..., H * hd :].clone()
    steps.rope_in_place(q, cos, sin)
    assert torch.equal(q, want) and torch.equal(fused[..., H * hd :], rest)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("post_ln", [False, True])
def test_bloom_decode_step_on_the_kernels_matches_its_operations(dtype, post_ln):
    """A cached BLOOM prefill and decode with its LayerNorms fused with the residual adds and the
    KV append on the kernels, against the same model with those two calls replaced by the PyTorch
    operations they stand for (the other kernels in both)."""
    from lmtool.families.bloom.config import BloomConfig
    from lmtool.families.bloom.model import BloomModel

    torch.manual_seed(int(post_ln))
    config = BloomConfig.from_dict(dict(
        model_type="bloom", vocab_size=60, hidden_size=48, n_layer=2, n_head=6,
        apply_residual_connection_post_layernorm=post_ln,
    ))
    model = BloomModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model = model.to(dtype).requires_grad_(False)
    ids = torch.randint(0, 60, (2, 9))

    def decode() -> torch.Tensor:
        cache = model.make_cache(2, 12, dtype, "cpu")
        model(ids[:, :6], cache=cache)
        return torch.cat([model(ids[:, i : i + 1], cache=cache) for i in range(6, 9)], dim=1)

    def add_layer_norm(x, delta, weight, bias, eps):
        total = x + delta if delta is not None else x
        return total, F.layer_norm(total, total.shape[-1:], weight, bias, eps)

    def kv_append(keys, values, k, v, position):
        keys[:, :, position : position + 1], values[:, :, position : position + 1] = k, v

    calls = []
    originals = steps.add_layer_norm, steps.kv_append
    steps.add_layer_norm = lambda *a: calls.append("norm") or originals[0](*a)
    steps.kv_append = lambda *a: calls.append("kv") or originals[1](*a)
    try:
        got = decode()
        steps.add_layer_norm, steps.kv_append = add_layer_norm, kv_append
        want = decode()
    finally:
        steps.add_layer_norm, steps.kv_append = originals
    assert "norm" in calls and "kv" in calls
    if dtype == torch.float32:
        assert_close(got, want, dtype)
    else:  # an ulp of a LayerNorm's moments, carried through the layers after it
        assert (got.float() - want.float()).abs().max() <= 1e-2 * want.float().abs().max()
