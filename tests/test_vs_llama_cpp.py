"""benchmarks/vs_llama_cpp.py without llama.cpp: a stand-in converter and a stand-in llama_cpp.Llama
(lmtool itself behind llama-cpp-python's eval/scores interface) check the script's own work:
conversion once and atomically, the converter's error in one line, alternated rounds, the report,
and the skip without llama-cpp-python."""

from __future__ import annotations

import ctypes
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import lmtool

DEMO = Path(lmtool.__file__).parent / "demo" / "zen-gemma"
SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "vs_llama_cpp.py"
CONVERTER = """
import sys
from pathlib import Path
model, out = sys.argv[1], sys.argv[sys.argv.index("--outfile") + 1]
assert sys.argv[sys.argv.index("--outtype") + 1] == "bf16"
if "broken" in model:
    sys.exit("NotImplementedError: Architecture 'Broken' not supported!")
Path(out).write_text(model)
"""


class StandInLlama:
    """llama-cpp-python's Llama as the script uses it, computing with lmtool on the GGUF's model;
    its logits are read as llama.cpp's are, through llama_get_logits_ith on its context."""

    def __init__(self, model_path: str, n_ctx: int, **kwargs):
        self.lm = lmtool.load(Path(model_path).read_text(), task="causal-lm", dtype="bfloat16", tokenizer=False)
        self.context = n_ctx
        self.ctx = self
        self.logits = np.zeros(self.n_vocab(), dtype=np.float32)
        self.reset()

    def n_vocab(self) -> int:
        return self.lm.model.config.vocab_size

    def reset(self):
        self.cache = self.lm.model.make_cache(1, self.context)

    def eval(self, tokens):
        with torch.inference_mode():
            logits = self.lm.model(torch.tensor([list(tokens)]), cache=self.cache)
        self.logits[:] = logits[0, -1].float().numpy()


def get_logits_ith(ctx: StandInLlama, i: int):
    assert i == -1
    return ctx.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def quantize(source: bytes, target: bytes, params) -> int:
    """llama_model_quantize: the stand-in "GGUF" (a model path) copied, with the type asked for."""
    Path(target.decode()).write_text(Path(source.decode()).read_text())
    quantized.append(params.ftype)
    return 0


quantized: list[int] = []
STAND_IN_LLAMA_CPP = types.SimpleNamespace(
    Llama=StandInLlama, llama_get_logits_ith=get_logits_ith, llama_model_quantize=quantize,
    llama_model_quantize_default_params=lambda: types.SimpleNamespace(ftype=0, nthread=0),
    LLAMA_FTYPE_MOSTLY_Q8_0=7, LLAMA_FTYPE_MOSTLY_Q4_0=2,
)


def script():
    spec = importlib.util.spec_from_file_location("vs_llama_cpp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def llama_dir(tmp_path):
    folder = tmp_path / "llama.cpp"
    folder.mkdir()
    (folder / "convert_hf_to_gguf.py").write_text(CONVERTER)
    return folder


def test_converts_once_alternates_both_runners_and_reports(tmp_path, llama_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", STAND_IN_LLAMA_CPP)
    bench = script()
    args = [str(DEMO), "--llama-cpp-dir", str(llama_dir), "--gguf-dir", str(tmp_path / "gguf"),
            "--prompt-len", "5", "--tokens", "4", "--repeat", "2", "--threads", "1"]
    threads = torch.get_num_threads()
    report = bench.main(args)
    assert torch.get_num_threads() == threads  # restored
    assert set(report["decode_tokens_per_s"]) == {"lmtool", "llama.cpp"}
    assert all(len(s["samples"]) == 2 and s["median"] > 0 for s in report["decode_tokens_per_s"].values())
    assert report["greedy_tokens_agreeing"] == 5  # the same model behind both: every greedy token
    assert report["runtime"]["backend"]["bfloat16"]
    out = capsys.readouterr().out
    assert "lmtool / llama.cpp:" in out and "greedy tokens agreeing: 5 of 5" in out
    gguf = list((tmp_path / "gguf").iterdir())
    assert len(gguf) == 1 and gguf[0].suffix == ".gguf"  # nothing half-written beside it
    before = gguf[0].stat().st_mtime_ns
    bench.main(args + ["--json"])
    assert gguf[0].stat().st_mtime_ns == before  # converted once, then reused


def test_converter_failure_is_one_line(tmp_path, llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", STAND_IN_LLAMA_CPP)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"broken: llama.cpp's converter failed: NotImplementedError: Architecture"):
        script().main([str(broken), "--llama-cpp-dir", str(llama_dir), "--gguf-dir", str(tmp_path / "g")])
    assert not list((tmp_path / "g").glob("*.gguf"))
    with pytest.raises(SystemExit, match="has no convert_hf_to_gguf.py"):
        script().main([str(DEMO), "--llama-cpp-dir", str(tmp_path)])


def test_without_llama_cpp_python_it_says_so_and_skips(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails
    assert script().main([str(DEMO)]) is None
    assert "skipped: llama-cpp-python is not installed" in capsys.readouterr().err


def test_q8_0_against_lmtool_int8_quantizes_both_once(tmp_path, llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", STAND_IN_LLAMA_CPP)
    quantized.clear()
    args = [str(DEMO), "--llama-cpp-dir", str(llama_dir), "--gguf-dir", str(tmp_path / "gguf"), "--llama-type", "q8_0",
            "--quantized-dir", str(tmp_path / "q"), "--prompt-len", "3", "--tokens", "2", "--repeat", "1"]
    report = script().main(args)
    assert report["llama_type"] == "q8_0" and quantized == [7]
    assert report["gguf"].endswith(".gguf") and "-q8_0-" in report["gguf"]
    ours = Path(report["model"])
    assert ours.parent == tmp_path / "q" and "-int8-g64-" in ours.name
    assert "quantization_config" in (ours / "config.json").read_text()  # lmtool's quantized folder, run by lmtool
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == [ours.name]  # nothing half-written
    assert script().main(args + ["--prepare-only"]) is None
    assert quantized == [7]  # both made once, then reused
