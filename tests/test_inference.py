"""The CPU inference path (lmtool.inference, lmtool.native): frozen linear layers give the results
of plain nn.Linear on both backends, keep the checkpoint's names, and copy nothing they need not."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest
import torch
import torch.nn.functional as F

import lmtool
from lmtool import inference, kernels
from lmtool.bench import random_checkpoint
from lmtool.checkpoint import Checkpoint

from helpers import kernel_tolerance

TINY = {
    "gemma": {
        "model_type": "gemma", "vocab_size": 80, "hidden_size": 48, "intermediate_size": 72,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12,
    },
    "bloom": {"model_type": "bloom", "vocab_size": 80, "hidden_size": 40, "n_layer": 2, "n_head": 4},
}
needs_native = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable here")


@pytest.fixture(params=[isa.name for isa in kernels.ISAS if kernels.runs_here(isa)])
def isa(request, monkeypatch):
    """Each instruction set's kernels that this CPU runs, whatever the dispatch would pick: on an
    AVX-512 machine the AVX2 and portable C builds run here too (NEON elsewhere: tests/test_neon.py)."""
    chosen = kernels.BY_NAME[request.param]
    lib = kernels.library_for(chosen.name)
    if lib is None:
        pytest.skip(f"the {chosen.name} kernels did not build here")
    monkeypatch.setattr(kernels, "library", lambda: lib)
    return chosen.name


@pytest.fixture(params=["native", "onednn"])
def backend(request, monkeypatch):
    """Run a test on each backend; onednn is what machines without a C compiler get."""
    if request.param == "native" and not kernels.available():
        pytest.skip("native kernels unavailable here")
    if request.param == "onednn":
        monkeypatch.setattr(kernels, "available", lambda: False)
    return request.param


def expected_backend(backend: str, dtype: str) -> str | None:
    """What backend_for should pick: without native bfloat16 matmul (a CPU without AVX512-BF16,
    or LMTOOL_ISA=avx2) oneDNN's bfloat16 path is emulated, so a bfloat16 model without the
    kernels stays on plain nn.Linear."""
    if backend == "onednn" and dtype == "bfloat16" and not kernels.fast_bf16_matmul():
        return None
    return backend


@pytest.fixture(scope="module", params=sorted(TINY))
def checkpoint(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return random_checkpoint(f"tiny-{request.param}", TINY[request.param], "bfloat16", root)


def logits(lm, ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits, then a cached decode of the last two tokens (batches under and
    over kernels.MAX_ROWS rows take different paths)."""
    with torch.inference_mode():
        full = lm.model(ids)
        cache = lm.model.make_cache(ids.shape[0], ids.shape[1])
        lm.model(ids[:, :-2], cache=cache)
        step = torch.cat([lm.model(ids[:, i : i + 1], cache=cache) for i in range(ids.shape[1] - 2, ids.shape[1])], 1)
    return torch.cat([full, step], 1).float()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_frozen_model_matches_plain_linear_layers(checkpoint, backend, dtype):
    frozen = lmtool.load(checkpoint, dtype=dtype, tokenizer=False)
    plain = lmtool.load(checkpoint, dtype=dtype, tokenizer=False, frozen=False)
    assert inference.backend_for(frozen.dtype, frozen.device) == expected_backend(backend, dtype)
    ids = torch.randint(0, 80, (3, 9))
    ours, reference = logits(frozen, ids), logits(plain, ids)
    # float32: summation order only. bfloat16: one rounding of each output, as oneDNN does.
    tol = 1e-5 if dtype == "float32" else 2e-2 * reference.abs().max().item()
    assert (ours - reference).abs().max().item() <= tol


@needs_native
@pytest.mark.parametrize("native_bf16", [True, False])
def test_bfloat16_prefill_runs_in_float32_without_native_bfloat16_matmul(checkpoint, monkeypatch, native_bf16):
    """On a CPU without native bfloat16 matmul, PyTorch's bfloat16 F.linear is emulated (slow):
    prefill takes the product in float32 from widened weights, within the bfloat16 tolerance."""
    monkeypatch.setattr(kernels, "fast_bf16_matmul", lambda: native_bf16)
    frozen = lmtool.load(checkpoint, dtype="bfloat16", tokenizer=False)
    plain = lmtool.load(checkpoint, dtype="bfloat16", tokenizer=False, frozen=False)
    seen: list[torch.dtype] = []
    linear = inference.prefill_linear
    monkeypatch.setattr(inference, "prefill_linear", lambda x, w, b=None: seen.append(w.dtype) or linear(x, w, b))
    ids = torch.randint(0, 80, (3, 9))  # 27 rows: over kernels.MAX_ROWS, the prefill path
    ours = logits(frozen, ids)
    monkeypatch.setattr(inference, "prefill_linear", linear)
    reference = logits(plain, ids)
    assert seen and set(seen) == {torch.bfloat16 if native_bf16 else torch.float32}
    assert (ours - reference).abs().max().item() <= 2e-2 * reference.abs().max().item()


def test_frozen_state_dict_keeps_checkpoint_names_dtypes_and_values(checkpoint, backend):
    for dtype in ("float32", "bfloat16"):
        frozen = lmtool.load(checkpoint, dtype=dtype, tokenizer=False).model.checkpoint_state_dict()
        plain = lmtool.load(checkpoint, dtype=dtype, tokenizer=False, frozen=False).model.checkpoint_state_dict()
        assert sorted(frozen) == sorted(plain)
        for name, value in plain.items():
            assert frozen[name].dtype == value.dtype and torch.equal(frozen[name], value), name


@needs_native
def test_float32_from_bfloat16_keeps_weights_in_bfloat16_without_copies(checkpoint):
    lm = lmtool.load(checkpoint, dtype="float32", tokenizer=False)
    assert lm.dtype == torch.float32
    assert isinstance(lm.model.backbone.embed_tokens, inference.CastEmbedding)
    frozen = [m for m in lm.model.modules() if isinstance(m, inference.NativeLinear)]
    frozen += lm.model.head.slices
    assert frozen and all(w.dtype == torch.bfloat16 for m in frozen for w in m.weights)
    # The tied head reads the embedding's own mapped tensor.
    assert lm.model.head.slices[0].weights[0].data_ptr() == lm.model.backbone.embed_tokens.table.data_ptr()


@pytest.mark.parametrize("activation, weight", sorted(kernels.KINDS, key=str))
def test_native_kernel_matches_f_linear_on_ragged_shapes(isa, activation, weight):
    for K in (5, 16, 33, 100):
        for rows in ([1], [9], [8, 3], [4, 13, 2]):
            for M in range(1, kernels.MAX_ROWS + 1):
                weights = [torch.randn(n, K).to(weight) for n in rows]
                biases = [torch.randn(n).to(activation) if i % 2 == 0 else None for i, n in enumerate(rows)]
                x = torch.randn(M, K).to(activation)
                out = kernels.NativeParts(weights, biases, activation)(x).float()
                bias = torch.cat([b.float() if b is not None else torch.zeros(n) for b, n in zip(biases, rows)])
                expected = F.linear(x.float(), torch.cat(weights).float(), bias)
                tol = 1e-4 if activation == torch.float32 else 1e-2 * (expected.abs().max().item() + 1)
                assert (out - expected).abs().max().item() <= tol, (K, rows, M)


@pytest.mark.parametrize("activation, weight", sorted(kernels.KINDS, key=str))
def test_native_kernel_on_weights_off_vector_boundaries(isa, activation, weight):
    # Checkpoint tensors are 8-byte aligned at best. Rows that start past a vector boundary are read
    # from the boundary with the lanes before them masked off; here the bytes around each tensor
    # hold NaN and inf, which would reach the sums if a masked lane were ever used. K = 100 rows do
    # not all start at the same offset (the unaligned path).
    for K in (64, 2048, 100):
        for offsets in ([0], [1], [4], [7, 7, 3], [31, 12, 0, 31]):
            weights = []
            for i, offset in enumerate(offsets):
                rows = 8 * i + 9
                buffer = torch.full((offset + rows * K + 64,), float("nan")).to(weight)
                buffer[offset + rows * K:] = float("inf")
                assert buffer.data_ptr() % 64 == 0  # so that `offset` sets the tensor's lead
                buffer[offset : offset + rows * K] = torch.randn(rows * K).to(weight)
                weights.append(buffer[offset : offset + rows * K].view(rows, K))
            for M in (1, 2, 4, 8, 16):
                x = torch.randn(M, K).to(activation)
                out = kernels.NativeParts(weights, [None] * len(weights), activation)(x).float()
                expected = F.linear(x.float(), torch.cat(weights).float())
                tol = 1e-4 * K**0.5 if activation == torch.float32 else 1e-2 * (expected.abs().max().item() + 1)
                assert (out - expected).abs().max().item() <= tol, (K, offsets, M)


@pytest.mark.parametrize("activation, weight", sorted(kernels.KINDS, key=str))
def test_native_kernel_reads_nothing_beyond_the_lines_of_a_tensor(isa, activation, weight):
    # Each tensor is placed against an unreadable page, ending right before it or starting at an
    # offset right after it: a load that reached past the cache lines holding the tensor's data
    # would crash the process here.
    libc = ctypes.CDLL(None)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page, size = mmap.PAGESIZE, torch.empty((), dtype=weight).element_size()
    read_write, private_anonymous = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    for K in (1, 17, 32, 100):
        for offset in (0, 1, 7, 31):
            for at_end in (False, True):
                nbytes = 9 * K * size
                pages = (nbytes + offset * size + page - 1) // page + 2
                base = libc.mmap(None, pages * page, read_write, private_anonymous, -1, 0)
                assert base not in (None, ctypes.c_void_p(-1).value)
                try:
                    libc.mprotect(base, page, 0)  # PROT_NONE
                    libc.mprotect(base + (pages - 1) * page, page, 0)
                    start = base + (pages - 1) * page - nbytes if at_end else base + page + offset * size
                    w = torch.frombuffer((ctypes.c_char * nbytes).from_address(start), dtype=weight).view(9, K)
                    w.copy_(torch.randn(9, K).to(weight))
                    for M in (1, 3, 16):
                        x = torch.randn(M, K).to(activation)
                        out = kernels.NativeParts([w], [None], activation)(x).float()
                        expected = F.linear(x.float(), w.float())
                        tol = 1e-4 * K**0.5 if activation == torch.float32 else 1e-2 * (expected.abs().max().item() + 1)
                        assert (out - expected).abs().max().item() <= tol, (K, offset, at_end, M)
                finally:
                    libc.munmap(base, pages * page)

def test_released_checkpoint_pages_read_back_unchanged(checkpoint):
    ckpt = Checkpoint(checkpoint)
    name = max(ckpt.keys(), key=lambda k: ckpt.info(k).numel)
    tensor = ckpt.tensor(name)
    before = tensor.clone()
    ckpt.release(tensor)
    assert torch.equal(tensor, before)
    ckpt.release(before)  # not a view of the file: ignored


def mapping_flags(address: int) -> set[str]:
    """The VmFlags of this process's mapping that holds `address` (Linux's /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                low, high = (int(part, 16) for part in head.split("-"))
                inside = low <= address < high
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE") or not os.path.isdir("/sys/kernel/mm/transparent_hugepage"),
                    reason="no transparent huge pages here")
def test_checkpoint_mappings_ask_for_huge_pages(checkpoint):
    # Decode streams every weight per token; 2 MB pages save it a page walk every 4 KB (see
    # lmtool.checkpoint.map_weights). "hg": the mapping carries MADV_HUGEPAGE.
    ckpt = Checkpoint(checkpoint)
    tensor = ckpt.tensor(max(ckpt.keys(), key=lambda k: ckpt.info(k).numel))
    assert "hg" in mapping_flags(tensor.data_ptr())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_gelu_matches_pytorch_gated_and_not(isa, dtype):
    # Widths around the kernel's 16-lane and 256-element chunks; extreme values saturate.
    for n in (1, 15, 16, 17, 255, 300):
        fused = (torch.randn(3, 2, 2 * n) * 6).to(dtype)
        fused[0, 0, 0] = -200.0
        gate, up = fused.split(n, dim=-1)  # column slices of one projection output, as in GeGLU
        expected = F.gelu(gate.float(), approximate="tanh")
        assert (kernels.gelu_tanh_mul(gate).float() - expected).abs().max() <= kernel_tolerance(dtype, expected)
        expected = expected * up.float()
        got = kernels.gelu_tanh_mul(gate, up)
        assert got.shape == gate.shape and got.dtype == dtype
        assert (got.float() - expected).abs().max() <= kernel_tolerance(dtype, expected), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B, H, KV, S, hd", [(1, 4, 4, 1, 16), (2, 8, 1, 37, 64), (3, 6, 2, 20, 12), (2, 4, 4, 70, 80)])
def test_native_one_query_attention_matches_sdpa(isa, dtype, B, H, KV, S, hd):
    torch.manual_seed(B * S + hd)
    cache_k, cache_v = (torch.randn(B, KV, S + 5, hd).to(dtype) for _ in range(2))
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]  # KV-cache views, as decoding passes them
    q = torch.randn(B, 1, H, hd).to(dtype).transpose(1, 2)
    bias = torch.randn(B * H, 1, S).to(dtype)
    key_mask = torch.rand(B, S) > 0.4
    key_mask[:, -1] = True  # the new token's own key

    def reference(bias, key_mask):
        scores_bias = torch.zeros(B, H, 1, S) if bias is None else bias.float().view(B, H, 1, S)
        if key_mask is not None:
            scores_bias = scores_bias.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        kv = [t.float().repeat_interleave(H // KV, dim=1) for t in (k, v)]
        return F.scaled_dot_product_attention(q.float(), *kv, attn_mask=scores_bias, scale=0.3)

    for with_bias, with_mask in [(False, False), (True, False), (False, True), (True, True)]:
        b, m = (bias if with_bias else None), (key_mask if with_mask else None)
        expected = reference(b, m)
        got = kernels.attend_one(q, k, v, 0.3, b, m[:, None, None, :] if m is not None else None)
        assert got.shape == (B, H, 1, hd) and got.dtype == dtype
        assert (got.float() - expected).abs().max() <= kernel_tolerance(dtype, expected), (with_bias, with_mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B, H, KV, S, hd", [(1, 8, 1, 145, 256), (1, 10, 1, 33, 256), (2, 6, 2, 37, 80), (1, 12, 2, 20, 12), (1, 4, 1, 9, 520)])
def test_native_attention_of_grouped_heads_is_each_head_alone(isa, dtype, B, H, KV, S, hd):
    # Heads that share a KV head go through its keys together, up to four at a time, as many
    # parts as threads; each head's sums must still be exactly the ones it gets alone (here: with
    # its own copy of the keys and values), whatever the threads and the grouping.
    torch.manual_seed(H * S + hd)
    k, v = (torch.randn(B, KV, S, hd).to(dtype) for _ in range(2))
    q = torch.randn(B, 1, H, hd).to(dtype).transpose(1, 2)
    bias = torch.randn(B * H, 1, S).to(dtype)
    mask = torch.rand(B, 1, 1, S) > 0.3
    mask[..., -1] = True
    alone = kernels.attend_one(q, *(t.repeat_interleave(H // KV, dim=1) for t in (k, v)), 0.3, bias, mask)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 8):
            torch.set_num_threads(n)
            assert torch.equal(kernels.attend_one(q, k, v, 0.3, bias, mask), alone), n
            assert torch.equal(kernels.attend_one(q, k, v, 0.3), kernels.attend_one(q, *(t.repeat_interleave(H // KV, dim=1) for t in (k, v)), 0.3)), n
    finally:
        torch.set_num_threads(threads)


def test_native_attention_of_a_fully_masked_row_is_zero_not_nan(isa):
    k = v = torch.randn(1, 2, 4, 16)
    out = kernels.attend_one(torch.randn(1, 2, 1, 16), k, v, 0.25, mask=torch.zeros(1, 1, 1, 4, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))


def test_kernels_stay_out_of_autograd():
    # Training (the demo's trainer, fine-tuning) needs gradients, which the kernels do not give.
    from lmtool.layers import gelu_tanh

    x = torch.randn(4, 8, requires_grad=True)
    assert not kernels.usable(x)
    gelu_tanh(x).sum().backward()
    expected = torch.autograd.grad(F.gelu(x, approximate="tanh").sum(), x)[0]
    assert torch.allclose(x.grad, expected)
    with torch.no_grad():
        assert kernels.usable(x) == kernels.available()
