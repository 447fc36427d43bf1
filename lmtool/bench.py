"""`lmtool bench`: speed and memory of a model, optionally against transformers in the same run.

A benchmark is a list of runs, each in a fresh process (lmtool/bench_worker.py), so that import,
load and time to first token are cold and peak RSS belongs to one run. With a peer, the runs of
lmtool and transformers alternate (ABBA order) so that the machine's drift (memory bandwidth on a
shared host moves by tens of percent within minutes) falls on both alike. Each run records how
much CPU other processes took meanwhile; a run on a busy machine is run again (max_foreign_cpu).
Each metric is reported as the median over repeats with its min-max spread. Because that drift
bounds batch-1 decode, each run times that decode in four parts with reads of a buffer between
them (bench_worker.timed_decode), and the report gives how close each run's decode came
to that read rate (the median over runs); the parent's probe after every run
(memory_read_bandwidth) goes to the provenance.

Random-weight checkpoints (--preset, --config) are written once, in the standard layout, under
the bench cache folder, so loading them is measured exactly as loading a downloaded model is.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__, hub
from .checkpoint import Checkpoint, PlannedTensor, atomic_folder, dtype_size, map_weights, write_weights
from .bench_worker import read_rates
from .errors import LmtoolError
from .inference import runtime
from .loading import DTYPES, build_model, family_of, read_config
from .registry import Family, families

PEERS = ("transformers",)
SHORT_PROMPT = 32  # prompt of the time-to-first-token and decode workloads
INIT_STD = 0.02  # transformers' initializer_range
WORKER = Path(__file__).with_name("bench_worker.py")
# The worker's own read-rate probe, read between the parts of its batch-1 decode: 8x a large L3
# cache, far less than the parent's 1 GiB (its pages are taken off the worker's peak RSS).
WORKER_PROBE_BYTES = 2**28
# How a report's decode_gbps@1 row probed the read rate its shares are of.
PROBED_BETWEEN_PARTS, PROBED_AFTER_RUNS = "between the parts of each run's decode", "after each run"
# runpy does not put the worker's folder on sys.path (that would shadow the standard library with
# lmtool's inspect.py and config.py).
BOOT = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"


def cache_root() -> Path:
    if os.environ.get("LMTOOL_BENCH_CACHE"):
        return Path(os.environ["LMTOOL_BENCH_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lmtool" / "bench"


# --- random-weight checkpoints ---------------------------------------------------------------


def presets() -> dict[str, tuple[Family, dict[str, Any]]]:
    """Every family's released sizes: preset name -> (family, config values)."""
    return {name: (family, values) for family in families().values() for name, values in family.presets.items()}


def preset_config(name: str) -> dict[str, Any]:
    known = presets()
    if name not in known:
        raise LmtoolError(f"unknown preset '{name}'; choose one of: {', '.join(sorted(known))}")
    family, values = known[name]
    return {"model_type": family.model_type, **values}


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmtoolError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmtoolError(f"{path}: not valid JSON ({exc})") from None
    family_of(data, str(path))
    return data


def model_config(ref: str) -> dict[str, Any]:
    """config.json of a local folder or a Hub model; no weights are downloaded."""
    parsed = hub.parse(ref)
    path = hub.hub_file(parsed, "config.json") if parsed.is_hub else parsed.path / "config.json"
    return read_config_file(path)


def random_tensor(info: PlannedTensor) -> torch.Tensor:
    """Values like a freshly initialised model: N(0, 0.02) matrices, unit norm scales, zero biases.
    Seeded by the name, so a checkpoint is the same wherever it is written."""
    seed = int.from_bytes(hashlib.sha256(info.name.encode()).digest()[:4], "little")
    generator = torch.Generator().manual_seed(seed)
    if len(info.shape) > 1:
        return torch.empty(info.shape, dtype=info.dtype).normal_(0.0, INIT_STD, generator=generator)
    return torch.zeros(info.shape, dtype=info.dtype) if info.name.endswith("bias") else torch.ones(info.shape, dtype=info.dtype)


def checkpoint_plan(family: Family, config, dtype: torch.dtype) -> list[PlannedTensor]:
    """The tensors a causal-LM checkpoint of this config holds, with random values on demand."""
    model = build_model(family, config, "causal-lm", meta=True)
    plan = []
    for name, param in model.checkpoint_state_dict().items():
        tensor_dtype = dtype if param.dtype.is_floating_point else param.dtype
        plan.append(PlannedTensor(name, tuple(param.shape), tensor_dtype, lambda: None))
    for item in plan:
        item.produce = lambda item=item: random_tensor(item)
    return plan


def random_checkpoint(
    name: str,
    config_values: dict[str, Any],
    dtype: str = "bfloat16",
    root: Path | None = None,
    on_start: Callable[[int], None] | None = None,
    on_tensor: Callable[[PlannedTensor], None] | None = None,
    on_write: Callable[[Path, int], None] | None = None,
    force: bool = False,
) -> Path:
    """A standard folder with config.json and random weights, written once to the cache:
    <root>/<name>-<dtype>. A folder whose config.json differs from this config is rewritten.

    on_write(folder, bytes) is told before anything is written. Weights larger than this
    machine's memory (which it could not benchmark) are refused unless `force`, and weights
    that would not fit on the disk always are."""
    if dtype not in DTYPES:
        raise LmtoolError(f"unknown checkpoint dtype '{dtype}'; choose {', '.join(DTYPES)}")
    family = family_of(config_values, name)
    values = {k: v for k, v in config_values.items() if k not in ("torch_dtype", "architectures")}
    values.update(dtype=dtype, architectures=[family.architecture("causal-lm")])
    config = family.config_class.from_dict(values, source=name)
    folder = (root or cache_root()) / f"{name}-{dtype}"
    config_json = config.to_json()
    if (folder / "config.json").is_file() and (folder / "config.json").read_text() == config_json:
        return folder
    plan = checkpoint_plan(family, config, DTYPES[dtype])
    total = sum(t.nbytes for t in plan)
    check_room(folder, name, total, force)
    if on_write:
        on_write(folder, total)
    if on_start:
        on_start(total)
    with atomic_folder(folder, force=True) as tmp:
        write_weights(tmp, plan, max_shard_size=2 * 10**9, on_tensor=on_tensor)
        (tmp / "config.json").write_text(config_json)
    return folder


def gigabytes(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def check_room(folder: Path, name: str, total: int, force: bool) -> None:
    """Refuse random weights that cannot fit on the disk, or (without force) in memory."""
    memory = total_memory()
    if memory and total > memory and not force:
        raise LmtoolError(
            f"{name}: its random weights take {gigabytes(total)}, more than this machine's "
            f"{gigabytes(memory)} of memory; give --force to write them to {folder} anyway"
        )
    existing = folder
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if total > free:
        raise LmtoolError(
            f"{folder}: {name} needs {gigabytes(total)} of random weights, and that disk has "
            f"{gigabytes(free)} free (--cache-dir picks another)"
        )


def total_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        return None


def config_name(values: dict[str, Any], stem: str) -> str:
    """A cache name for a config given as a file: its stem and a hash of its content."""
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


# --- the benchmark ---------------------------------------------------------------------------


@dataclass
class BenchSpec:
    folder: Path  # a standard model folder
    name: str  # what the report calls the model
    dtypes: list[str]  # compute dtypes; "auto" = the checkpoint's
    prompt_lens: list[int] = field(default_factory=lambda: [512])
    batches: list[int] = field(default_factory=lambda: [1])
    repeat: int = 5
    warmup: bool = True
    new_tokens: int = 32
    against: list[str] = field(default_factory=list)
    device: str = "cpu"
    threads: int | None = None
    # A run during which other processes used more than this share of the CPU (percent) is run
    # again, at most RETRIES times: on a shared machine its numbers describe the neighbours.
    max_foreign_cpu: float = 20.0
    bandwidth: bool = True  # probe the memory read bandwidth after each measured run (cpu only)
    timeout_s: float = 3600.0


@dataclass
class Metric:
    key: str  # load_s, ttft_s, prefill@512, decode@1, peak_rss
    label: str
    unit: str
    higher_is_better: bool


# Batch-1 decode reads every weight once per token (a tied embedding once, as the LM head), so
# the weight bytes it reads × tokens/s is the read rate it reaches (a lower bound: the KV cache is
# not counted). Runners may read different bytes (streamed_bytes), so this ratio can differ from
# the tok/s ratio.
EFFECTIVE = "decode_gbps@1"
READ_RATE = "read_gbps@1"  # not a metric: the read probe between the parts of a run's batch-1 decode


def metrics_of(spec: BenchSpec, device: str) -> list[Metric]:
    metrics = [
        Metric("load_s", "import + load", "s", False),
        Metric("ttft_s", f"time to first token (cold, {SHORT_PROMPT}-token prompt)", "s", False),
    ]
    metrics += [Metric(f"prefill@{n}", f"prefill {n} tokens", "tok/s", True) for n in spec.prompt_lens]
    metrics += [Metric(f"decode@{b}", f"decode batch {b}", "tok/s", True) for b in spec.batches]
    if 1 in spec.batches:
        metrics.append(Metric(EFFECTIVE, "decode b1 weight read rate (bytes read per token × tok/s)", "GB/s", True))
    metrics.append(Metric("peak_rss", "peak RSS", "GiB", False))
    metrics.append(Metric("model_rss", "peak RSS above torch's own", "GiB", False))
    if device.startswith("cuda"):
        metrics.append(Metric("peak_cuda", "peak CUDA allocated", "GiB", False))
    return metrics


def flatten(sample: dict, weights: int) -> dict[str, float]:
    """A worker's result as {metric key: value}; weights: the weight bytes one decode step reads."""
    values = {
        "load_s": sample["load_s"],
        "ttft_s": sample["ttft_s"],
        "peak_rss": sample["peak_rss_bytes"] / 2**30,
        "model_rss": (sample["peak_rss_bytes"] - sample["torch_rss_bytes"]) / 2**30,
    }
    values.update({f"prefill@{n}": v for n, v in sample["prefill_tokens_per_s"].items()})
    values.update({f"decode@{b}": v for b, v in sample["decode_tokens_per_s"].items()})
    if "decode@1" in values:
        values[EFFECTIVE] = weights * values["decode@1"] / 1e9
        if "read_gbps_between_decode_parts" in sample:
            # The read rate of the sums between the decode's parts, as the decode's is taken: all the
            # bytes over all the time (the harmonic mean of equal reads), not the best sum, which
            # picks a noisy machine's fastest moment where the decode's average has its slow ones.
            values[READ_RATE] = statistics.harmonic_mean(sample["read_gbps_between_decode_parts"])
    if "peak_cuda_bytes" in sample:
        values["peak_cuda"] = sample["peak_cuda_bytes"] / 2**30
    return values


def summarize(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "samples": values}


def check_peer(peer: str) -> None:
    if peer not in PEERS:
        raise LmtoolError(f"unknown peer '{peer}'; lmtool can run against: {', '.join(PEERS)}")
    try:
        metadata.version(peer)
    except metadata.PackageNotFoundError:
        raise LmtoolError(f"--against {peer}: {peer} is not installed (pip install {peer})") from None


def resolve_dtypes(names: list[str], folder: Path) -> list[str]:
    """'auto' becomes the checkpoint's dtype name, so both runners get the same explicit dtype."""
    from .loading import resolve_dtype

    _, config = read_config(folder)
    checkpoint = Checkpoint(folder)
    resolved = []
    for name in names:
        dtype = resolve_dtype(None if name == "auto" else name, config, checkpoint)
        resolved.append(str(dtype).removeprefix("torch."))
    return list(dict.fromkeys(resolved))


def weight_bytes(folder: Path, dtype: str) -> int:
    """Bytes of the model's weights once loaded in dtype (floating tensors take its size)."""
    size = dtype_size(DTYPES[dtype])
    return sum(i.numel * size if i.dtype.is_floating_point else i.nbytes for i in Checkpoint(folder).infos())


def streamed_bytes(folder: Path, dtype: str, backend: str | None) -> int:
    """Weight bytes one batch-1 decode step reads: the run dtype's, except where lmtool's native
    kernels keep a bfloat16 checkpoint's weights in bfloat16 for a float32 model (inference.py);
    a tensor the step reads several times (a Zamba2 shared block's) counts each time."""
    infos = Checkpoint(folder).infos()
    stored = {info.dtype for info in infos if info.dtype.is_floating_point}
    if backend == "native" and dtype == "float32" and stored == {torch.bfloat16}:
        dtype = "bfloat16"
    size = dtype_size(DTYPES[dtype])
    family, config = read_config(folder)
    return sum(
        (i.numel * size if i.dtype.is_floating_point else i.nbytes) * family.reads_per_step(config, i.name)
        for i in infos
    )


def memory_read_bandwidth(threads: int | None = None, nbytes: int = 2**30, repeats: int = 5) -> float:
    """The machine's memory read bandwidth in GB/s (1e9 bytes): the best of `repeats` sums of a
    float32 tensor of nbytes, with `threads` torch threads as the runs use. Called in the parent,
    between runs, so that it neither adds to a worker's peak RSS nor competes with a run."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        tensor = torch.ones(nbytes // 4, dtype=torch.float32)  # written once, so its pages are mapped
        best = max(read_rates(tensor, repeats))
        del tensor  # a tensor this large is unmapped at once, before the next run starts
        return best
    finally:
        torch.set_num_threads(previous)


def warm_page_cache(folder: Path) -> None:
    """Read the weight files so that every run loads from a warm page cache (as the peer baseline
    did); a host that evicts idle pages would otherwise make load times depend on run order. They
    are read through lmtool's own mapping (a byte of every page), so that a file read from disk
    lands in the page cache as lmtool's loads would leave it (in huge pages: map_weights)."""
    for path in sorted(folder.glob("*.safetensors")):
        if path.stat().st_size == 0:
            continue
        mapped = map_weights(path)
        try:
            torch.frombuffer(mapped, dtype=torch.uint8)[:: mmap.PAGESIZE].sum()
        finally:
            mapped.close()


def spawn(spec: BenchSpec, runner: str, dtype: str) -> dict:
    """One run in a fresh process; returns the worker's measurements."""
    warm_page_cache(spec.folder)
    with tempfile.TemporaryDirectory(prefix="lmtool-bench-") as tmp:
        result_file = Path(tmp) / "result.json"
        job = {
            "runner": runner, "folder": str(spec.folder), "dtype": dtype, "device": spec.device,
            "threads": spec.threads,
            "prompt_lens": spec.prompt_lens, "batches": spec.batches, "new_tokens": spec.new_tokens,
            "short_prompt": SHORT_PROMPT, "result_file": str(result_file),
            "read_probe_bytes": WORKER_PROBE_BYTES if spec.bandwidth and spec.device == "cpu" else 0,
        }
        env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        job["spawned_at"] = time.time()
        try:
            proc = subprocess.run(
                [sys.executable, "-c", BOOT, str(WORKER)], input=json.dumps(job), text=True,
                capture_output=True, env=env, timeout=spec.timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise LmtoolError(f"{runner} {dtype} run took longer than {spec.timeout_s:.0f} s") from None
        if proc.returncode != 0 or not result_file.is_file():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise LmtoolError(f"{runner} {dtype} run failed (exit {proc.returncode}):\n{tail}")
        return json.loads(result_file.read_text())


RETRIES = 2  # extra attempts of a run on a busy machine


def measured_run(spec: BenchSpec, runner: str, dtype: str, runs: list[dict[str, Any]]) -> dict:
    """One run, repeated while the machine was busy with other work (see max_foreign_cpu); every
    attempt is logged in `runs`."""
    for attempt in range(RETRIES + 1):
        sample = spawn(spec, runner, dtype)
        busy = sample.get("foreign_cpu_percent") or 0.0
        kept = busy <= spec.max_foreign_cpu or attempt == RETRIES
        runs.append({"runner": runner, "dtype": dtype, "foreign_cpu_percent": busy, "kept": kept})
        if kept:
            return sample
    raise AssertionError("unreachable")


def run_order(runners: list[str], repeat: int) -> list[str]:
    """ABBA order: every pair of repeats runs each runner first once."""
    order = []
    for rep in range(repeat):
        order += runners if rep % 2 == 0 else runners[::-1]
    return order


def check_runnable(spec: BenchSpec) -> None:
    """What can be refused before anything is written or run: an unknown peer, a device this
    machine lacks (one line here rather than a worker's traceback per run)."""
    for peer in spec.against:
        check_peer(peer)
    if spec.device != "cpu":
        from .loading import resolve_device

        resolve_device(spec.device)


def busy_runs(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs kept although other processes took more of the CPU than allowed (the re-runs ran out)."""
    limit = report["settings"]["max_foreign_cpu"]
    return [r for r in report["runs"] if r["kept"] and r["foreign_cpu_percent"] > limit]


def run_bench(spec: BenchSpec, on_run: Callable[[str, str, int, int], None] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns {provenance, model, settings, results}. on_run(runner, dtype,
    index, total) is called before each run (warm-up runs have index 0)."""
    check_runnable(spec)
    dtypes = resolve_dtypes(spec.dtypes, spec.folder)
    runners = ["lmtool", *spec.against]
    order = run_order(runners, spec.repeat)
    total = len(dtypes) * len(order)
    done = 0
    results = []
    foreign: list[float] = []  # other processes' share of the CPU during each measured run
    backends: dict[str, str] = {}  # dtype -> lmtool's linear backend (lmtool.inference)
    runs: list[dict[str, Any]] = []  # every measured attempt, in the order they ran
    # The probe is a CPU read; a CUDA run's decode is bound by the GPU's memory instead.
    probe = spec.bandwidth and spec.device == "cpu"
    bandwidth: dict[str, list[float]] = {}  # dtype -> GB/s after each of its measured runs
    for dtype in dtypes:
        if spec.warmup:
            # Warms the page cache and any on-disk caches; its numbers are dropped.
            for runner in runners:
                if on_run:
                    on_run(runner, dtype, 0, total)
                spawn(spec, runner, dtype)
        samples: dict[str, list[dict[str, float]]] = {r: [] for r in runners}
        for runner in order:
            done += 1
            if on_run:
                on_run(runner, dtype, done, total)
            sample = measured_run(spec, runner, dtype, runs)
            samples[runner].append(flatten(sample, streamed_bytes(spec.folder, dtype, sample.get("backend"))))
            if probe:  # right after the run, so the samples follow the machine's drift
                bandwidth.setdefault(dtype, []).append(memory_read_bandwidth(spec.threads))
            foreign.append(sample.get("foreign_cpu_percent") or 0.0)
            if sample.get("backend"):
                backends[dtype] = sample["backend"]
        results += compare(spec, dtype, samples, bandwidth.get(dtype))
    every = [gbps for values in bandwidth.values() for gbps in values]
    return {
        "provenance": {
            **provenance(spec),
            "memory_bandwidth_gbps": summarize(every) if every else None,  # None: not measured
            "max_foreign_cpu_percent": max(foreign, default=0.0),  # of the runs kept
            "runs_discarded_as_busy": sum(not r["kept"] for r in runs),
            "lmtool_linear_backend": backends,
        },
        "model": {"name": spec.name, "folder": str(spec.folder)},
        "settings": {k: v for k, v in asdict(spec).items() if k not in ("folder", "name", "timeout_s")},
        "results": results,
        "runs": runs,
    }


def compare(
    spec: BenchSpec, dtype: str, samples: dict[str, list[dict[str, float]]], bandwidth: list[float] | None = None
) -> list[dict[str, Any]]:
    """One row per metric: each runner's summary and lmtool's ratio to each peer. bandwidth: the
    memory read bandwidth measured between this dtype's runs (GB/s), if it was."""
    rows = []
    weights = weight_bytes(spec.folder, dtype)
    for metric in metrics_of(spec, spec.device):
        row: dict[str, Any] = {"dtype": dtype, **asdict(metric), "runners": {}, "ratio": {}}
        for runner, runs in samples.items():
            row["runners"][runner] = summarize([run[metric.key] for run in runs])
        for peer in spec.against:
            peer_median = row["runners"][peer]["median"]
            row["ratio"][peer] = row["runners"]["lmtool"]["median"] / peer_median if peer_median else None
        if metric.key in ("peak_rss", "model_rss"):
            row["weight_gib"] = weights / 2**30
            row["per_weight_bytes"] = {r: s["median"] * 2**30 / weights for r, s in row["runners"].items()}
        if metric.key == EFFECTIVE and all(READ_RATE in run for runs in samples.values() for run in runs):
            # How close each run's decode came to the read rate probed during it, the median over
            # runs: a shared machine's rate drifts too much between runs for a common roof.
            row["memory_bandwidth_gbps"] = summarize([run[READ_RATE] for runs in samples.values() for run in runs])
            row["bandwidth_probed"] = PROBED_BETWEEN_PARTS
            row["share_of_bandwidth"] = {
                runner: statistics.median(run[EFFECTIVE] / run[READ_RATE] for run in runs)
                for runner, runs in samples.items()
            }
        elif metric.key == EFFECTIVE and bandwidth:
            row["memory_bandwidth_gbps"] = summarize(bandwidth)
            row["bandwidth_probed"] = PROBED_AFTER_RUNS
            # Medians over the same stretch of time: how close each runner's decode gets to the roof.
            roof = row["memory_bandwidth_gbps"]["median"]
            row["share_of_bandwidth"] = {r: s["median"] / roof for r, s in row["runners"].items()}
        rows.append(row)
    return rows


# --- provenance ------------------------------------------------------------------------------


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's name, with its x86 family and model where cpuinfo gives them: a virtual machine
    often names only the vendor line ("AMD EPYC" for a Zen 4 and a Zen 5 alike)."""
    try:
        fields: dict[str, str] = {}
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip() and fields:
                break  # the first processor's block
        if "model name" in fields:
            name = fields["model name"]
            if "cpu family" in fields and "model" in fields:
                name += f" (family {fields['cpu family']}, model {fields['model']})"
            return name
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def provenance(spec: BenchSpec) -> dict[str, Any]:
    device = spec.device
    if device.startswith("cuda") and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(torch.device(device))
    else:
        device_name = cpu_model()
    return {
        "lmtool": __version__,
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "device_name": device_name,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": spec.threads or torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        if hasattr(os, "sysconf") else None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # the kernels' instruction set and the CPU features that chose it (lmtool.inference.runtime)
        "cpu_runtime": runtime() if device == "cpu" else None,
    }


# --- output ----------------------------------------------------------------------------------


def csv_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (dtype, metric, runner), provenance repeated on each (as llama-bench does)."""
    setup = dict(report["provenance"])
    # The bandwidth summary becomes three flat columns (empty when it was not measured).
    bandwidth = setup.pop("memory_bandwidth_gbps", None) or {}
    for stat in ("median", "min", "max"):
        setup[f"memory_bandwidth_gbps_{stat}"] = bandwidth.get(stat)
    # ... and the CPU runtime two: the kernels' instruction set and the CPU features behind it.
    cpu = setup.pop("cpu_runtime", None) or {}
    setup["kernels"] = cpu.get("kernels")
    setup["cpu_features"] = " ".join(cpu.get("cpu_features", []))
    rows = []
    for result in report["results"]:
        for runner, summary in result["runners"].items():
            rows.append(
                {
                    "model": report["model"]["name"],
                    "dtype": result["dtype"],
                    "metric": result["key"],
                    "unit": result["unit"],
                    "runner": runner,
                    "median": summary["median"],
                    "min": summary["min"],
                    "max": summary["max"],
                    "repeats": len(summary["samples"]),
                    "ratio_lmtool_to_runner": result["ratio"].get(runner),
                    "share_of_bandwidth": result.get("share_of_bandwidth", {}).get(runner),
                    **setup,
                }
            )
    return rows
