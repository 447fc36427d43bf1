"""One `lmtool bench` run, in a fresh process: load a model, time it, report JSON.

lmtool.bench starts this file with `python -c "runpy.run_path(<this file>)"` and the run's spec
on stdin, so that the process is cold (import and load are measured for real, and peak RSS is
this run's alone). The module imports nothing from lmtool at the top: the transformers runner
never imports lmtool, so its import time is transformers' own.

Timings follow one method for both runners, each through its own generate(), and each shape
runs once untimed before it is timed (llama-bench's warm-up):
- load_s: process start (taken by the parent just before spawning) to a model ready to run;
- ttft_s: process start to the first token of a short prompt (import + load + prefill + sample);
- prefill: prompt tokens / (generate() call to the first logits), logits for the last position only;
- decode: batch * (n - 1) / (first to last of n generated tokens), so the prefill is excluded;
  with the read-rate probe, batch 1 is timed in four parts with reads of the probe between them
  (timed_decode), the same tokens per second over the parts' decode time.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def random_ids(batch: int, length: int, vocab_size: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    # Ids 0-9 hold special tokens in every family benchmarked; stay clear of them.
    return torch.randint(10, vocab_size, (batch, length), generator=generator)


class LmtoolRunner:
    def __init__(self, spec: dict):
        self.spec = spec

    def load(self) -> None:
        import lmtool
        from lmtool.generation import SamplingParams

        self.lm = lmtool.load(
            self.spec["folder"], task="causal-lm", dtype=self.spec["dtype"], device=self.spec["device"],
            tokenizer=False,
        )
        from lmtool.inference import backend_for

        self.backend = backend_for(self.lm.dtype, self.lm.device) or "nn.Linear"
        self.greedy = SamplingParams(temperature=0.0)
        self.vocab_size = self.lm.config.vocab_size

    def generate(self, ids, new_tokens: int) -> dict:
        from lmtool.generation import generate

        _, stats = generate(
            self.lm.model, ids.tolist(), max_new_tokens=new_tokens, params=self.greedy, seed=0,
            eos_ids=[], ignore_eos=True,
        )
        # decode_s runs from the end of the prefill to the last token: n samples, n - 1 forwards.
        return {"prefill_s": stats.prefill_s, "decode_s": stats.decode_s}


def is_quantized(folder: str) -> bool:
    import json
    from pathlib import Path

    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    return bool(config.get("quantization_config"))


class TransformersRunner:
    def __init__(self, spec: dict):
        self.spec = spec

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        dtype = getattr(torch, self.spec["dtype"])
        extra = {}
        if is_quantized(self.spec["folder"]):
            # transformers runs compressed-tensors int8/int4 weights dequantized (its default path
            # cannot run naive int8 nor packed int4 zero points on CPU).
            from transformers import CompressedTensorsConfig

            extra["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(self.spec["folder"], dtype=dtype, **extra)
        self.model = model.to(self.spec["device"]).eval()
        self.vocab_size = self.model.config.vocab_size

    def generate(self, ids, new_tokens: int) -> dict:
        from transformers import LogitsProcessor, LogitsProcessorList

        stamps: list[float] = []

        class Stamp(LogitsProcessor):
            """Called once per new token, just after the forward that produced its logits."""

            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

        ids = ids.to(self.spec["device"])
        start = time.perf_counter()
        with self.torch.inference_mode():
            self.model.generate(
                ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, logits_processor=LogitsProcessorList([Stamp()]),
                pad_token_id=0,
            )
        return {"prefill_s": stamps[0] - start, "decode_s": stamps[-1] - stamps[0]}


RUNNERS = {"lmtool": LmtoolRunner, "transformers": TransformersRunner}


class ForeignLoad:
    """CPU time that other processes used while this run ran, as a share of the machine: the
    machine is shared, and a run that competed for its cores is slower for that reason alone."""

    def __init__(self):
        self.start = self.sample()

    @staticmethod
    def sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields[:3]) + sum(fields[5:8])  # user nice system, irq softirq steal
        own = resource.getrusage(resource.RUSAGE_SELF)
        return busy / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime, time.time()

    def percent(self) -> float | None:
        end = self.sample()
        if end is None or self.start is None:
            return None
        busy, own, wall = (b - a for a, b in zip(self.start, end))
        return max(0.0, busy - own) / (wall * (os.cpu_count() or 1)) * 100 if wall > 0 else None


def peak_rss_bytes() -> int:
    """This process's peak resident set. On Linux VmHWM, which belongs to the process image:
    ru_maxrss carries over the parent's peak through fork and exec, so a bench parent that once
    held a large buffer would raise every run's figure."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def peak_memory(device: str) -> dict:
    import torch

    peak = {"peak_rss_bytes": peak_rss_bytes()}
    if device.startswith("cuda"):
        peak["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return peak


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def read_rates(tensor, repeats: int) -> list[float]:
    """The GB/s (1e9 bytes) at which each of `repeats` sums of a resident tensor read it: the
    memory's read rate when the tensor is far larger than the caches."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        tensor.sum()
        rates.append(tensor.nbytes / (time.perf_counter() - start) / 1e9)
    return rates


def timed_decode(runner, ids, new_tokens: int, probe=None, parts: int = 4) -> tuple[float, list[float] | None]:
    """Decode tokens per second: batch * (n - 1) over the first to last of n generated tokens.
    With a probe (batch 1), timed instead in `parts` generations of new_tokens / parts tokens with
    two reads of the probe before each and after the last, and those reads' rates returned too:
    batch 1 reads the weights at the memory's rate at best, and a shared machine's rate moves
    within seconds (23-52 GB/s between reads around one run, Zen 5 host), so the reads are spread
    over the decode's own time and the run's share is its decode against them."""
    if probe is None:
        timing = runner.generate(ids, new_tokens=new_tokens)
        return ids.shape[0] * (new_tokens - 1) / timing["decode_s"], None
    rates = read_rates(probe, 2)
    steps, decode_s = 0, 0.0
    per_part = max(2, new_tokens // parts)
    for _ in range(parts):
        timing = runner.generate(ids, new_tokens=per_part)
        steps, decode_s = steps + ids.shape[0] * (per_part - 1), decode_s + timing["decode_s"]
        rates += read_rates(probe, 2)
    return steps / decode_s, rates


def run(spec: dict) -> dict:
    spawned_at = spec["spawned_at"]
    load = ForeignLoad()
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    # The read-rate probe's buffer (read_probe_bytes; 0: none), made before anything is measured:
    # the time it takes is not the run's, and its pages (all written, so all resident from here to
    # the end) are taken off the peak and the baseline below.
    probe, probe_rss = None, 0
    if spec.get("read_probe_bytes"):
        made = time.time()
        probe = torch.ones(spec["read_probe_bytes"] // 4, dtype=torch.float32)
        probe_rss = probe.nbytes
        spawned_at += time.time() - made
    # What the runtime costs before any model: both runners import torch first.
    baseline = peak_memory("cpu")["peak_rss_bytes"] - probe_rss
    runner = RUNNERS[spec["runner"]](spec)
    runner.load()
    sync(spec["device"])
    result: dict = {"load_s": time.time() - spawned_at, "threads": torch.get_num_threads()}
    result["backend"] = getattr(runner, "backend", None)
    vocab, short = runner.vocab_size, spec["short_prompt"]
    runner.generate(random_ids(1, short, vocab, seed=1), new_tokens=1)
    sync(spec["device"])
    result["ttft_s"] = time.time() - spawned_at
    # Steady-state speeds: each shape runs once untimed first (allocations, kernel selection).
    result["prefill_tokens_per_s"] = {}
    for length in spec["prompt_lens"]:
        ids = random_ids(1, length, vocab, seed=2)
        runner.generate(ids, new_tokens=1)
        timing = runner.generate(ids, new_tokens=1)
        result["prefill_tokens_per_s"][str(length)] = length / timing["prefill_s"]
    result["decode_tokens_per_s"] = {}
    new_tokens = spec["new_tokens"]
    for batch in spec["batches"]:
        ids = random_ids(batch, short, vocab, seed=3)
        runner.generate(ids, new_tokens=3)
        tokens_per_s, reads = timed_decode(runner, ids, new_tokens, probe if batch == 1 else None)
        result["decode_tokens_per_s"][str(batch)] = tokens_per_s
        if reads:
            result["read_gbps_between_decode_parts"] = reads
    result.update(peak_memory(spec["device"]))
    result["peak_rss_bytes"] -= probe_rss
    result["torch_rss_bytes"] = baseline
    result["foreign_cpu_percent"] = load.percent()
    return result


def main() -> None:
    spec = json.load(sys.stdin)
    result = run(spec)
    with open(spec["result_file"], "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
