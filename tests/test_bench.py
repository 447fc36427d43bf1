"""`lmtool bench` plumbing on tiny random models: checkpoints written once, fresh-process runs,
the peer alternating, and the output formats. No timing is asserted (the machine is shared)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import torch

import lmtool
from lmtool import bench
from lmtool.bench import (
    EFFECTIVE, READ_RATE, BenchSpec, config_name, csv_rows, memory_read_bandwidth, preset_config, presets,
    random_checkpoint, run_order, weight_bytes,
)
from lmtool.cli.bench import describe_setup
from lmtool.errors import ExitCode, LmtoolError

from helpers import run_cli

TINY_GEMMA = {
    "model_type": "gemma", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8,
}
TINY_BLOOM = {"model_type": "bloom", "vocab_size": 64, "hidden_size": 32, "n_layer": 2, "n_head": 4}
QUICK = ["--repeat", "1", "--no-warmup", "--prompt-len", "8", "--new-tokens", "3"]


@pytest.fixture(autouse=True)
def probe(monkeypatch) -> list:
    """The bandwidth probe as a fixed 12.5 GB/s: it reads 1 GiB per run, which would slow the tests
    and disturb anything else timed on the machine. Returns the threads of each call."""
    calls: list = []
    monkeypatch.setattr(bench, "memory_read_bandwidth", lambda threads=None: calls.append(threads) or 12.5)
    monkeypatch.setattr(bench, "WORKER_PROBE_BYTES", 2**20)  # the workers' own probe, during their decode
    return calls


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("configs") / "tiny-gemma.json"
    path.write_text(json.dumps(TINY_GEMMA))
    return path


def test_presets_cover_the_released_sizes_of_both_families():
    names = presets()
    assert {"gemma-2b", "gemma-7b", "bloom-560m", "bloom-1b7"} <= set(names)
    assert preset_config("gemma-2b")["model_type"] == "gemma"
    with pytest.raises(lmtool.errors.LmtoolError, match="unknown preset 'nope'; choose one of: .*bloom-560m"):
        preset_config("nope")


@pytest.mark.parametrize("values", [TINY_GEMMA, TINY_BLOOM], ids=["gemma", "bloom"])
def test_random_checkpoint_is_a_standard_folder_written_once(tmp_path, values):
    folder = random_checkpoint("tiny", values, "bfloat16", tmp_path)
    assert folder == tmp_path / "tiny-bfloat16"
    lm = lmtool.load(folder, dtype="float32", tokenizer=False)
    assert lm.task == "causal-lm" and lm.dtype == lmtool.loading.DTYPES["float32"]
    weights = sorted(folder.glob("*.safetensors"))
    stamps = [w.stat().st_mtime_ns for w in weights]
    assert random_checkpoint("tiny", values, "bfloat16", tmp_path) == folder
    assert [w.stat().st_mtime_ns for w in weights] == stamps  # reused, not rewritten
    random_checkpoint("tiny", {**values, "vocab_size": 96}, "bfloat16", tmp_path)
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 96  # a new shape rewrites


def test_random_weights_are_seeded_by_name(tmp_path):
    a = random_checkpoint("a", TINY_GEMMA, "float32", tmp_path / "1")
    b = random_checkpoint("b", TINY_GEMMA, "float32", tmp_path / "2")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_config_name_is_stable_and_content_addressed():
    assert config_name(TINY_GEMMA, "x") == config_name(dict(reversed(TINY_GEMMA.items())), "x")
    assert config_name(TINY_GEMMA, "x") != config_name(TINY_BLOOM, "x")


def test_runs_alternate_in_abba_order():
    assert run_order(["lmtool", "transformers"], 4) == ["lmtool", "transformers", "transformers", "lmtool"] * 2
    assert run_order(["lmtool"], 2) == ["lmtool", "lmtool"]


def test_json_report_has_every_metric_per_dtype_and_provenance(capsys, tiny_config, cache):
    code, out, err = run_cli(
        capsys, "bench", "--config", str(tiny_config), "--cache-dir", str(cache), *QUICK, "--batch", "1,2",
        "--prompt-len", "8,16", "--dtype", "bfloat16,float32", "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    for key in ("lmtool", "torch", "transformers", "device", "cpu", "threads", "date"):
        assert key in report["provenance"]
    # the kernels' instruction set and the CPU's features, in the report and its header
    active = lmtool.kernels.active_isa()
    assert report["provenance"]["cpu_runtime"]["kernels"] == (active.name if active else None)
    assert report["provenance"]["cpu_runtime"]["cpu_features"] == lmtool.kernels.relevant_features()
    assert f"kernels: {active.name if active else 'off'}" in describe_setup(report)
    rows = {(r["dtype"], r["key"]) for r in report["results"]}
    metrics = {"load_s", "ttft_s", "prefill@8", "prefill@16", "decode@1", "decode@2", "decode_gbps@1", "peak_rss", "model_rss"}
    assert rows == {(d, m) for d in ("bfloat16", "float32") for m in metrics}
    for result in report["results"]:
        summary = result["runners"]["lmtool"]
        assert summary["min"] <= summary["median"] <= summary["max"] and len(summary["samples"]) == 1
        assert summary["median"] > 0 or result["key"] == "model_rss"  # a tiny model can fit in torch's own peak
    assert "run 1/2: lmtool bfloat16" in err  # progress goes to stderr


def test_against_transformers_runs_both_and_reports_ratios(capsys, cache):
    config = cache / "tiny-bloom.json"
    config.write_text(json.dumps(TINY_BLOOM))
    code, out, err = run_cli(
        capsys, "bench", "--config", str(config), "--cache-dir", str(cache), *QUICK, "--against", "transformers",
        "--repeat", "2", "--csv",
    )
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {r["runner"] for r in rows} == {"lmtool", "transformers"}
    assert {"torch", "transformers", "cpu", "threads", "dtype", "median", "min", "max", "kernels", "cpu_features"} <= set(rows[0])
    assert all(r["ratio_lmtool_to_runner"] == "" for r in rows if r["runner"] == "lmtool")
    peer = [r for r in rows if r["runner"] == "transformers"]
    assert all(r["repeats"] == "2" for r in peer)
    # A ratio is empty only where the peer's value is 0 (a tiny model's memory above torch's own).
    assert all(float(r["ratio_lmtool_to_runner"]) > 0 for r in peer if r["metric"] != "model_rss")


def test_markdown_table_when_stdout_is_not_a_terminal(capsys, tiny_config, cache):
    code, out, err = run_cli(capsys, "bench", "--config", str(tiny_config), "--cache-dir", str(cache), *QUICK)
    assert code == 0, err
    assert "| dtype | metric | lmtool |" in out
    assert "decode batch 1 (tok/s) ↑" in out and "× weights" in out
    assert "decode b1 weight read rate (bytes read per token × tok/s) (GB/s) ↑" in out and "% of read bandwidth" in out
    assert "memory read bandwidth 12.50 [12.50–12.50] GB/s" in out


def test_cpu_model_names_the_x86_family_and_model(tmp_path):
    """A virtual machine's "AMD EPYC" is a Zen 4 or a Zen 5: the family and model tell them apart,
    read from the first processor's block; without them (ARM) the name alone."""
    cpuinfo = tmp_path / "cpuinfo"
    block = "processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: {f}\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n\n"
    cpuinfo.write_text(block.format(n=0, f=26) + block.format(n=1, f=25))
    assert bench.cpu_model(cpuinfo) == "AMD EPYC (family 26, model 2)"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some ARM core\nBogoMIPS\t: 50.00\n")
    assert bench.cpu_model(cpuinfo) == "Some ARM core"


def test_memory_read_bandwidth_probe_runs_and_restores_threads():
    threads = torch.get_num_threads()
    assert memory_read_bandwidth(threads=1, nbytes=2**20, repeats=2) > 0  # no timing asserted
    assert torch.get_num_threads() == threads


def test_bandwidth_after_each_run_reaches_the_json_and_the_csv(capsys, tiny_config, cache, probe):
    args = ["bench", "--config", str(tiny_config), "--cache-dir", str(cache), *QUICK, "--repeat", "2", "--threads", "1"]
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    assert probe == [1, 1]  # once after each measured run, with the runs' threads
    report = json.loads(out)
    assert report["provenance"]["memory_bandwidth_gbps"] == {"median": 12.5, "min": 12.5, "max": 12.5, "samples": [12.5] * 2}
    rows = {r["key"]: r for r in report["results"]}
    effective, decode = rows["decode_gbps@1"], rows["decode@1"]["runners"]["lmtool"]
    assert effective["label"] == "decode b1 weight read rate (bytes read per token × tok/s)" and effective["unit"] == "GB/s"
    weights = weight_bytes(Path(report["model"]["folder"]), effective["dtype"])
    read = effective["runners"]["lmtool"]["samples"]
    assert read == pytest.approx([weights * v / 1e9 for v in decode["samples"]])
    # the share's roof is each run's own reads between its decode's parts, not the parent's between runs
    assert effective["bandwidth_probed"] == bench.PROBED_BETWEEN_PARTS
    roofs = effective["memory_bandwidth_gbps"]["samples"]
    assert len(roofs) == 2 and all(r > 0 and r != 12.5 for r in roofs)
    assert effective["share_of_bandwidth"]["lmtool"] == pytest.approx(statistics.median(a / b for a, b in zip(read, roofs)))

    code, out, err = run_cli(capsys, *args, "--csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {r["memory_bandwidth_gbps_median"] for r in rows} == {"12.5"}
    [effective] = [r for r in rows if r["metric"] == "decode_gbps@1"]
    assert effective["unit"] == "GB/s" and float(effective["share_of_bandwidth"]) > 0


def test_share_of_bandwidth_is_the_median_of_each_runs_own_share(monkeypatch):
    """A run on a slow stretch of the machine is measured against that stretch's read rate: with
    roofs 10 and 20 GB/s, decodes of 9 and 18 GB/s are both 90 %, though a common roof (15) would
    give 60 % and 120 %."""
    spec = BenchSpec(folder=Path("unused"), name="x", dtypes=["bfloat16"], against=["transformers"], prompt_lens=[8])
    runs = {
        "lmtool": [{EFFECTIVE: 9.0, READ_RATE: 10.0}, {EFFECTIVE: 18.0, READ_RATE: 20.0}, {EFFECTIVE: 17.0, READ_RATE: 20.0}],
        "transformers": [{EFFECTIVE: 4.0, READ_RATE: 10.0}, {EFFECTIVE: 10.0, READ_RATE: 20.0}, {EFFECTIVE: 6.0, READ_RATE: 10.0}],
    }
    for samples in runs.values():
        for sample in samples:
            sample.update({m.key: 1.0 for m in bench.metrics_of(spec, "cpu") if m.key != EFFECTIVE})
    monkeypatch.setattr(bench, "weight_bytes", lambda folder, dtype: 1)
    [row] = [r for r in bench.compare(spec, "bfloat16", runs, [15.0, 15.0]) if r["key"] == EFFECTIVE]
    assert row["bandwidth_probed"] == bench.PROBED_BETWEEN_PARTS
    assert row["share_of_bandwidth"]["lmtool"] == pytest.approx(0.9)
    assert row["share_of_bandwidth"]["transformers"] == pytest.approx(0.5)
    assert row["memory_bandwidth_gbps"]["median"] == 15.0  # all six probes


def test_no_bandwidth_skips_the_probe(capsys, tiny_config, cache, probe):
    code, out, err = run_cli(
        capsys, "bench", "--config", str(tiny_config), "--cache-dir", str(cache), *QUICK, "--no-bandwidth", "--json"
    )
    assert code == 0, err
    assert probe == []
    report = json.loads(out)
    assert report["provenance"]["memory_bandwidth_gbps"] is None
    effective = next(r for r in report["results"] if r["key"] == "decode_gbps@1")
    assert "share_of_bandwidth" not in effective  # the effective rate is still reported
    assert {row["memory_bandwidth_gbps_median"] for row in csv_rows(report)} == {None}


@pytest.mark.parametrize("args, message", [
    ([], "give one of MODEL, --preset NAME or --config FILE"),
    (["some/model", "--preset", "gemma-2b"], "give one of MODEL, --preset NAME or --config FILE"),
    (["--preset", "gemma-2b", "--against", "vllm"], "unknown peer 'vllm'"),
    (["--preset", "gemma-2b", "--json", "--csv"], "give --json or --csv, not both"),
    # bloom (176B) is 352 GB of bfloat16: more than this machine's memory, refused without --force.
    (["--preset", "bloom"], "give --force to write them"),
])
def test_bad_invocations_fail_in_one_line_before_any_work(capsys, tmp_path, args, message):
    code, out, err = run_cli(capsys, "bench", *args, "--cache-dir", str(tmp_path))
    assert code == ExitCode.ERROR
    assert message in err and out == ""
    assert not any(tmp_path.iterdir())  # nothing written


def test_bad_lists_are_usage_errors(capsys, tiny_config):
    code, _, err = run_cli(capsys, "bench", "--config", str(tiny_config), "--batch", "1,x")
    assert code == ExitCode.USAGE and "comma-separated integers" in err
    code, _, err = run_cli(capsys, "bench", "--preset", "gemma-9b")
    assert code == ExitCode.USAGE and "'gemma-9b' is not one of gemma-2b, gemma-7b" in err


def test_a_run_on_a_busy_machine_is_run_again_at_most_twice(monkeypatch):
    busy = iter([80.0, 5.0, 90.0, 90.0, 90.0])
    monkeypatch.setattr(bench, "spawn", lambda spec, runner, dtype: {"foreign_cpu_percent": next(busy)})
    spec = bench.BenchSpec(folder=Path(), name="x", dtypes=["float32"], max_foreign_cpu=20.0)
    runs: list[dict] = []
    assert bench.measured_run(spec, "lmtool", "float32", runs)["foreign_cpu_percent"] == 5.0
    assert bench.measured_run(spec, "lmtool", "float32", runs)["foreign_cpu_percent"] == 90.0  # kept: out of retries
    assert [r["kept"] for r in runs] == [False, True, False, False, True]


def test_read_rate_counts_the_bytes_each_backend_reads(tmp_path, tiny_config):
    from lmtool.bench import random_checkpoint, read_config_file, streamed_bytes

    folder = random_checkpoint("tiny", read_config_file(tiny_config), "bfloat16", tmp_path)
    half, full = weight_bytes(folder, "bfloat16"), weight_bytes(folder, "float32")
    assert full == 2 * half
    # native kernels keep a bfloat16 checkpoint's weights in bfloat16 for a float32 model
    assert streamed_bytes(folder, "float32", "native") == half
    assert streamed_bytes(folder, "float32", "onednn") == full
    assert streamed_bytes(folder, "float32", None) == full  # transformers
    assert streamed_bytes(folder, "bfloat16", "native") == half


def kernel_sweep(monkeypatch):
    """benchmarks/kernel_sweep.py as a module (it is a script, not part of the package)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_sweep.py"
    spec = importlib.util.spec_from_file_location("kernel_sweep", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "kernel_sweep", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not lmtool.kernels.available(), reason="native kernels unavailable here")
def test_kernel_sweep_alternates_two_kernel_builds_and_compares_their_outputs(tmp_path, probe, capsys, monkeypatch):
    sweep = kernel_sweep(monkeypatch)
    # Another revision's source, as git would give it: the same kernels with a different text, so a
    # second shared object is built and loaded beside this tree's.
    monkeypatch.setattr(
        sweep, "revision_sources",
        lambda rev, isa: {**lmtool.kernels.package_sources(isa), "common.h": lmtool.kernels.package_sources(isa)["common.h"] + f"\n/* {rev} */\n"},
    )
    folder = random_checkpoint("tiny", TINY_GEMMA, "bfloat16", tmp_path)
    threads = torch.get_num_threads()
    report = sweep.main([str(folder), "--rows", "1,3", "--repeat", "2", "--against", "other", "--threads", "1"])
    assert torch.get_num_threads() == threads
    assert sorted(report["rows"]) == [1, 3]
    for by_library in report["rows"].values():
        assert sorted(by_library) == ["other", "this tree"]
        assert all(r["median_gbps"] > 0 for r in by_library.values())
        assert by_library["other"]["max_abs_diff"] == 0.0  # the same kernels, built twice
    assert report["bandwidth_gbps"] == [12.5, 12.5] and probe == [1, 1]
    out = capsys.readouterr().out
    # two layers of q/k/v, o, gate/up and down, and the tied LM head
    assert "9 native layers" in out and "  3 rows  other" in out


def test_kernel_sweep_reads_a_revisions_kernel_source_from_git(monkeypatch):
    sweep = kernel_sweep(monkeypatch)
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=sweep.ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    for isa in lmtool.kernels.ISAS:
        sources = sweep.revision_sources("HEAD", isa)
        assert "void lm_linear(" in sources["common.h"] and isa.source in sources
    # before lmtool/kernels/ existed: the AVX-512 source string of lmtool/native.py
    if subprocess.run(["git", "cat-file", "-e", "fb9805e"], cwd=sweep.ROOT, capture_output=True).returncode == 0:
        legacy = sweep.revision_sources("fb9805e", lmtool.kernels.BY_NAME["avx512"])
        assert list(legacy) == ["avx512.c"] and "void lm_linear(" in legacy["avx512.c"]
    with pytest.raises(SystemExit, match="cannot read lmtool/kernels/common.h at 'no-such-rev'"):
        sweep.revision_sources("no-such-rev", lmtool.kernels.BY_NAME["avx2"])


def test_bench_on_a_missing_cuda_is_one_line_before_any_work(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = run_cli(capsys, "bench", "--preset", "gemma-2b", "--device", "cuda", "--cache-dir", str(tmp_path))
    assert code == ExitCode.ERROR and out == "" and "CUDA is not available" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_random_weights_say_where_they_go_and_must_fit_on_the_disk(capsys, tmp_path, tiny_config, monkeypatch):
    code, _, err = run_cli(capsys, "bench", "--config", str(tiny_config), "--cache-dir", str(tmp_path), *QUICK,
                           "--no-bandwidth", "--json")
    assert code == 0 and f"of random tiny-gemma-" in err and str(tmp_path) in err
    monkeypatch.setattr(bench.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    with pytest.raises(LmtoolError, match="that disk has 0.0 GB free"):
        bench.random_checkpoint("other", TINY_GEMMA, "float32", tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_runs_kept_on_a_busy_machine_are_reported(capsys, tiny_config, cache, monkeypatch):
    real_spawn = bench.spawn
    monkeypatch.setattr(bench, "spawn", lambda spec, runner, dtype: {**real_spawn(spec, runner, dtype),
                                                                     "foreign_cpu_percent": 55.0})
    code, _, err = run_cli(capsys, "bench", "--config", str(tiny_config), "--cache-dir", str(cache), *QUICK,
                           "--no-bandwidth", "--json")
    assert code == 0
    assert "warning: 1 run(s) kept after 2 re-runs although other processes took up to 55% of the CPU" in err
