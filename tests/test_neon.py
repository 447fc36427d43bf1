"""The NEON kernels, checked rather than assumed: neon.c (with and without the bf16 extension) is
built with an aarch64 cross compiler together with tests/native/kernel_driver.c and run under
qemu-user (`-cpu max`: BFDOT included), and its outputs are compared with PyTorch's. Skipped where
the tools are absent; .ci/run installs them (Debian's gcc-aarch64-linux-gnu and qemu-user). The
same driver also runs the portable C build natively, so the harness itself is checked wherever a C
compiler is."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmtool import kernels

from helpers import kernel_tolerance

DRIVER = Path(__file__).resolve().parent / "native" / "kernel_driver.c"
CROSS, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"
# ISA -> (compiler, how to run what it builds)
TARGETS = {
    "neon": (CROSS, [QEMU, "-cpu", "max"]),
    "neon-bf16": (CROSS, [QEMU, "-cpu", "max"]),
    "portable": (kernels.compiler(), []),
}


@pytest.fixture(scope="module", params=list(TARGETS))
def driver(request, tmp_path_factory) -> list[str]:
    """The command that runs the driver built with this ISA's kernels."""
    isa = kernels.BY_NAME[request.param]
    compiler, runner = TARGETS[isa.name]
    missing = [tool for tool in (compiler, *runner[:1]) if not tool or not shutil.which(tool)]
    if missing:
        pytest.skip(f"needs {' and '.join(str(t) for t in missing)} (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    binary = tmp_path_factory.mktemp(isa.name) / "driver"
    command = [
        compiler, *(f for f in kernels.CFLAGS if f not in ("-shared", "-fPIC")), *isa.cflags, f"-DKERNELS=\"{isa.source}\"", "-I", str(kernels.SOURCE_DIR),
        str(DRIVER), "-o", str(binary),
    ]
    if runner:
        command.append("-static")  # qemu-user then needs no aarch64 libraries at run time
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, kernels.first_error(done.stderr)
    return [*runner, str(binary)]


class Batch:
    """Cases written as files, run by one driver invocation, then compared."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.lines: list[str] = []
        self.inputs = 0
        self.checks: list[tuple[str, torch.dtype, torch.Size, torch.Tensor, str]] = []

    def save(self, tensor: torch.Tensor | None) -> str:
        if tensor is None:
            return "-"
        path = self.folder / f"in{self.inputs}.bin"
        self.inputs += 1
        path.write_bytes(tensor.contiguous().flatten().view(torch.uint8).numpy().tobytes())
        return str(path)

    def expect(self, dtype: torch.dtype, expected: torch.Tensor, label: str) -> str:
        out = str(self.folder / f"out{len(self.checks)}.bin")
        self.checks.append((out, dtype, expected.shape, expected, label))
        return out

    def run(self, driver: list[str]) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        done = subprocess.run(driver, input="\n".join(self.lines) + "\n", capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        for out, dtype, shape, expected, label in self.checks:
            got = torch.frombuffer(bytearray(Path(out).read_bytes()), dtype=dtype).view(shape).float()
            assert (got - expected).abs().max().item() <= kernel_tolerance(dtype, expected), label


def test_kernels_match_pytorch(driver, tmp_path):
    torch.manual_seed(0)
    batch = Batch(tmp_path)
    # linear: every kind, K around the vector widths, several parts with and without bias, 1..16 rows
    for (activation, weight), kind in kernels.KINDS.items():
        for K in (5, 16, 33, 100):
            for rows in ([1], [9], [8, 3], [4, 13, 2]):
                for M in (1, 2, 3, 8, 16):
                    weights = [torch.randn(n, K).to(weight) for n in rows]
                    biases = [torch.randn(n).to(activation) if i % 2 == 0 else None for i, n in enumerate(rows)]
                    x = torch.randn(M, K).to(activation)
                    bias = torch.cat([b.float() if b is not None else torch.zeros(n) for b, n in zip(biases, rows)])
                    expected = F.linear(x.float(), torch.cat(weights).float(), bias)
                    out = batch.expect(activation, expected, f"linear {activation} {weight} K={K} rows={rows} M={M}")
                    parts = " ".join(f"{w.shape[0]} {batch.save(w)} {batch.save(b)}" for w, b in zip(weights, biases))
                    batch.lines.append(f"linear {kind} {M} {K} {out} {batch.save(x)} {len(rows)} {parts}")
    for dtype in (torch.float32, torch.bfloat16):
        bf16 = int(dtype == torch.bfloat16)
        # gelu_tanh_mul: widths around the vector and chunk sizes, saturating values
        for n in (1, 15, 17, 300):
            gate, up = (torch.randn(3, n) * 6).to(dtype), torch.randn(3, n).to(dtype)
            gate[0, 0] = -200.0
            for factor in (None, up):
                expected = F.gelu(gate.float(), approximate="tanh") * (1 if factor is None else factor.float())
                out = batch.expect(dtype, expected, f"gelu {dtype} n={n} gated={factor is not None}")
                batch.lines.append(f"gelu {bf16} 3 {n} {out} {batch.save(gate)} {batch.save(factor)}")
        # attend_one: grouped heads, bias and key mask
        for B, H, KV, S, hd in [(1, 4, 4, 1, 16), (2, 8, 1, 37, 64), (3, 6, 2, 20, 12), (2, 4, 4, 70, 80)]:
            q, k, v = torch.randn(B, H, hd).to(dtype), torch.randn(B, KV, S, hd).to(dtype), torch.randn(B, KV, S, hd).to(dtype)
            bias, mask = torch.randn(B * H, S).to(dtype), torch.rand(B, S) > 0.4
            mask[:, -1] = True
            for with_bias, with_mask in [(False, False), (True, True)]:
                scores = bias.float().view(B, H, 1, S) if with_bias else torch.zeros(B, H, 1, S)
                if with_mask:
                    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
                kv = [t.float().repeat_interleave(H // KV, dim=1) for t in (k, v)]
                expected = F.scaled_dot_product_attention(q.float()[:, :, None], *kv, attn_mask=scores, scale=0.3)
                out = batch.expect(dtype, expected.view(B, H, hd), f"attend {dtype} {(B, H, KV, S, hd)} {with_bias}")
                batch.lines.append(
                    f"attend {bf16} {B} {H} {KV} {S} {hd} 0.3 {out} {batch.save(q)} {batch.save(k)} {batch.save(v)} "
                    f"{batch.save(bias if with_bias else None)} {batch.save(mask.to(torch.uint8) if with_mask else None)}"
                )
    batch.run(driver)
