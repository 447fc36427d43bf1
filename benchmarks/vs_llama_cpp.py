"""lmtool against llama.cpp: the same checkpoint converted with llama.cpp's own converter, decode
timed in one process, the two alternating round by round (the order swapped every round: the
host's memory bandwidth drifts by a third within minutes, so only alternated numbers compare).

--llama-type picks what is compared: bf16 (default; lmtool runs the checkpoint as it is), or
llama.cpp's Q8_0 / Q4_0 (quantized from the bf16 GGUF by llama.cpp's own quantizer, through
llama-cpp-python) against lmtool's int8 / int4 with groups of 64 (`lmtool quantize MODEL OUT
--scheme int8|int4 --group-size 64 --no-verify`, written once under --quantized-dir, or given
with --lmtool-model). Both are 8.5 / about 4.5-5.5 bits per weight; their rounding differs, so
fewer greedy tokens agree than in bf16.

llama.cpp runs through llama-cpp-python, built for this CPU from its source distribution, whose
vendored llama.cpp also holds the converter (convert_hf_to_gguf.py and its gguf-py):

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/lcp
    tar xf /tmp/lcp/llama_cpp_python-*.tar.gz -C /tmp/lcp
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install /tmp/lcp/llama_cpp_python-*/     # ~10 min on 2 cores
    python benchmarks/vs_llama_cpp.py path/to/gemma-2b --llama-cpp-dir /tmp/lcp/llama_cpp_python-*/vendor/llama.cpp

The converter also needs transformers and sentencepiece (the test extra has both) and its own
gguf-py, which it finds beside itself (the script also puts it on PYTHONPATH, should the `gguf`
package be absent). Each GGUF file is written once (atomically) under --gguf-dir and reused.
Families llama.cpp lacks (RecurrentGemma, Zamba2) end with the converter's message. Without
llama-cpp-python the script says so and exits 0.

A checkpoint without tokenizer files (`lmtool bench --preset` folders) is converted with the demo
model's SentencePiece tokenizer.model standing in: llama.cpp fills the rest of the vocabulary up
to config.json's size with unused tokens, and both runners are given token ids, never text. (This
serves SentencePiece families, Gemma; BLOOM's converter needs the model's own tokenizer.json.)

(Named vs_llama_cpp.py, not llama_cpp.py: a script of that name would shadow the package it imports.)

Both runners are given the same prompt token ids and decode greedily for --tokens steps; the
report gives tokens/s (median [min-max] of --repeat rounds), the ratio, and how many greedy tokens
the two agree on (a check that the conversion is the same model; bfloat16 rounding may part them
after a while, and sooner on random weights, whose logits are close together). llama.cpp's logits
are read in place (llama_get_logits_ith) and both runners take the argmax over the vocabulary in
NumPy or PyTorch: a few tens of microseconds per step, small beside a step of a model worth
benchmarking.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAND_IN_TOKENIZER = ROOT / "lmtool" / "demo" / "zen-gemma" / "tokenizer.model"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
# --llama-type -> (llama.cpp file type name, lmtool quantize scheme); bf16 needs neither.
QUANTIZED = {"q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", "int8"), "q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", "int4")}
GROUP_SIZE = 64


def fail(message: str) -> SystemExit:
    return SystemExit(f"vs_llama_cpp.py: {message}")


def find_converter(llama_cpp_dir: str | None) -> Path:
    """convert_hf_to_gguf.py in --llama-cpp-dir, else $LLAMA_CPP_DIR."""
    folder = llama_cpp_dir or os.environ.get("LLAMA_CPP_DIR")
    if not folder:
        raise fail("give --llama-cpp-dir (a llama.cpp checkout, or vendor/llama.cpp of the llama-cpp-python sdist)")
    script = Path(folder) / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise fail(f"{folder}: has no convert_hf_to_gguf.py (expected a llama.cpp source folder)")
    return script


def files_stamp(model: Path, *extra: bytes) -> str:
    """12 hex digits of a hash of the model folder's file names, sizes and times (and `extra`):
    what a cached product of the folder depends on."""
    stamp = hashlib.sha256()
    for path in sorted(model.iterdir()):
        if path.is_file():
            stat = path.stat()
            stamp.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    for data in extra:
        stamp.update(data)
    return stamp.hexdigest()[:12]


def converter_input(model: Path, folder: Path) -> Path:
    """The folder to convert: the model itself, or (no tokenizer files) links to its files in
    `folder` beside the stand-in SentencePiece tokenizer.model."""
    if any((model / name).is_file() for name in TOKENIZER_FILES):
        return model
    for path in model.iterdir():
        if path.is_file():
            (folder / path.name).symlink_to(path.resolve())
    (folder / "tokenizer.model").symlink_to(STAND_IN_TOKENIZER)
    return folder


def converter_env(converter: Path) -> dict[str, str]:
    """The environment for the converter: its own gguf-py first on the path (the script inserts
    it too, unless NO_LOCAL_GGUF is set), so no `gguf` package needs to be installed."""
    env = dict(os.environ)
    gguf_py = converter.parent / "gguf-py"
    if gguf_py.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(gguf_py), env.get("PYTHONPATH")) if p)
    return env


def convert(model: Path, converter: Path, gguf_dir: Path) -> Path:
    """The model as a bfloat16 GGUF, converted once per (model files, converter) and reused."""
    target = gguf_dir / f"{model.name}-bf16-{files_stamp(model, converter.read_bytes())}.gguf"
    if target.is_file():
        return target
    gguf_dir.mkdir(parents=True, exist_ok=True)
    print(f"converting {model} with {converter} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=gguf_dir) as tmp:
        partial = Path(tmp) / target.name
        staged = Path(tmp) / model.name
        staged.mkdir()
        done = subprocess.run(
            [sys.executable, str(converter), str(converter_input(model, staged)), "--outfile", str(partial),
             "--outtype", "bf16"],
            capture_output=True, text=True, env=converter_env(converter),
        )
        if done.returncode != 0 or not partial.is_file():
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise fail(f"{model}: llama.cpp's converter failed: {lines[-1] if lines else 'no message'}")
        os.replace(partial, target)
    return target


def quantize_gguf(bf16: Path, llama_type: str, threads: int) -> Path:
    """The bf16 GGUF quantized to Q8_0 or Q4_0 by llama.cpp's quantizer (llama_model_quantize,
    what the llama-quantize tool runs, with its default choices), once, beside the bf16 file."""
    import llama_cpp

    target = bf16.with_name(bf16.name.replace("-bf16-", f"-{llama_type}-"))
    if target.is_file():
        return target
    print(f"quantizing {bf16.name} to {llama_type} with llama.cpp ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=bf16.parent) as tmp:
        partial = Path(tmp) / target.name
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, QUANTIZED[llama_type][0])
        params.nthread = threads
        status = llama_cpp.llama_model_quantize(str(bf16).encode(), str(partial).encode(), params)
        if status != 0 or not partial.is_file():
            raise fail(f"{bf16}: llama.cpp's quantizer failed (status {status})")
        os.replace(partial, target)
    return target


def quantize_lmtool(model: Path, llama_type: str, quantized_dir: Path) -> Path:
    """The model quantized by `lmtool quantize` to the scheme that matches llama_type, once per
    (model files, lmtool's quantizer source) (no verification run: this script measures speed,
    and a random bench checkpoint has no text to verify on)."""
    scheme = QUANTIZED[llama_type][1]
    quantizer = [path.read_bytes() for path in sorted((ROOT / "lmtool" / "quantize").glob("*.py"))]
    target = quantized_dir / f"{model.name}-{scheme}-g{GROUP_SIZE}-{files_stamp(model, *quantizer)}"
    if (target / "config.json").is_file():
        return target
    quantized_dir.mkdir(parents=True, exist_ok=True)
    print(f"quantizing {model} to {scheme} with lmtool ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=quantized_dir) as tmp:
        partial = Path(tmp) / target.name
        done = subprocess.run(
            [sys.executable, "-m", "lmtool", "quantize", str(model), str(partial), "--scheme", scheme,
             "--group-size", str(GROUP_SIZE), "--no-verify", "--quiet"],
            capture_output=True, text=True,
        )
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise fail(f"{model}: lmtool quantize failed: {lines[-1] if lines else 'no message'}")
        os.replace(partial, target)
    return target


class LmtoolRunner:
    name = "lmtool"

    def __init__(self, model: Path, context: int):
        import lmtool

        self.lm = lmtool.load(str(model), task="causal-lm", dtype="bfloat16", tokenizer=False)
        self.context = context

    def run(self, prompt: list[int], steps: int) -> tuple[float, list[int]]:
        """Seconds for `steps` greedy decode steps after the prompt, and the tokens chosen."""
        import torch

        with torch.inference_mode():
            cache = self.lm.model.make_cache(1, self.context)
            logits = self.lm.model(torch.tensor([prompt]), cache=cache)
            token = int(logits[0, -1].argmax())
            chosen = [token]
            start = time.perf_counter()
            for _ in range(steps):
                logits = self.lm.model(torch.tensor([[token]]), cache=cache)
                token = int(logits[0, -1].argmax())
                chosen.append(token)
            return time.perf_counter() - start, chosen


class LlamaCppRunner:
    name = "llama.cpp"

    def __init__(self, gguf: Path, context: int, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(gguf), n_ctx=context, n_batch=512, n_threads=threads, n_threads_batch=threads,
            logits_all=False, verbose=False,
        )

    def last_logits(self):
        """The last evaluated token's logits, read in place from llama.cpp's context as a NumPy
        view (eval fills `scores` only with logits_all=True, which computes every prompt row)."""
        import llama_cpp
        import numpy as np

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))

    def run(self, prompt: list[int], steps: int) -> tuple[float, list[int]]:
        llm = self.llm
        llm.reset()
        llm.eval(prompt)
        token = int(self.last_logits().argmax())
        chosen = [token]
        start = time.perf_counter()
        for _ in range(steps):
            llm.eval([token])
            token = int(self.last_logits().argmax())
            chosen.append(token)
        return time.perf_counter() - start, chosen


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading greedy tokens two runners share."""
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model folder in the standard layout (Gemma, BLOOM)")
    parser.add_argument("--llama-cpp-dir", help="llama.cpp source folder with convert_hf_to_gguf.py (or $LLAMA_CPP_DIR)")
    parser.add_argument("--gguf-dir", default=str(Path.home() / ".cache" / "lmtool" / "gguf"),
                        help="where the converted GGUF is kept (default: ~/.cache/lmtool/gguf)")
    parser.add_argument("--llama-type", choices=["bf16", *QUANTIZED], default="bf16",
                        help="llama.cpp's weights: bf16, or Q8_0 / Q4_0 against lmtool's int8 / int4 (groups of 64)")
    parser.add_argument("--lmtool-model", help="with q8_0/q4_0: an lmtool quantized folder to use (default: made "
                        "by lmtool quantize under --quantized-dir)")
    parser.add_argument("--quantized-dir", default=str(Path.home() / ".cache" / "lmtool" / "quantized"),
                        help="where lmtool's quantized folder is kept (default: ~/.cache/lmtool/quantized)")
    parser.add_argument("--prepare-only", action="store_true", help="write the GGUF (and quantized) files, time nothing")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="decode steps timed per round")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (>= 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.tokens < 1 or args.prompt_len < 1:
        parser.error("--repeat, --tokens and --prompt-len must be at least 1")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("vs_llama_cpp.py: skipped: llama-cpp-python is not installed (see this script's docstring for the "
              "build from source)", file=sys.stderr)
        return None
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise fail(f"{model}: not a model folder (no config.json)")
    gguf = convert(model, find_converter(args.llama_cpp_dir), Path(args.gguf_dir))
    ours = model
    if args.llama_type != "bf16":
        gguf = quantize_gguf(gguf, args.llama_type, args.threads)
        ours = Path(args.lmtool_model) if args.lmtool_model else quantize_lmtool(model, args.llama_type,
                                                                                   Path(args.quantized_dir))
    if args.prepare_only:
        print(f"{gguf}\n{ours}")
        return None

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return measure(args, ours, gguf)
    finally:
        torch.set_num_threads(threads)


def measure(args: argparse.Namespace, model: Path, gguf: Path) -> dict:
    """model: the folder lmtool runs (the checkpoint, or its quantized folder)."""
    from lmtool.inference import runtime, runtime_lines

    context = args.prompt_len + args.tokens + 8
    runners = [LmtoolRunner(model, context), LlamaCppRunner(gguf, context, args.threads)]
    vocab = runners[0].lm.model.config.vocab_size
    prompt = [(7 + 31 * i) % vocab for i in range(args.prompt_len)]
    rates: dict[str, list[float]] = {r.name: [] for r in runners}
    chosen: dict[str, list[int]] = {}
    for round_ in range(args.repeat + 1):  # round 0: warm-up, not kept
        for runner in runners if round_ % 2 == 0 else runners[::-1]:
            seconds, tokens = runner.run(prompt, args.tokens)
            if round_:
                rates[runner.name].append(args.tokens / seconds)
            chosen[runner.name] = tokens
    report = {
        "model": str(model),
        "gguf": str(gguf),
        "llama_type": args.llama_type,
        "threads": args.threads,
        "prompt_len": args.prompt_len,
        "tokens": args.tokens,
        "runtime": runtime(),
        "decode_tokens_per_s": {name: {"median": statistics.median(v), "min": min(v), "max": max(v), "samples": v}
                                for name, v in rates.items()},
        "greedy_tokens_agreeing": agreement(chosen["lmtool"], chosen["llama.cpp"]),
    }
    medians = {name: s["median"] for name, s in report["decode_tokens_per_s"].items()}
    report["ratio_lmtool_to_llama_cpp"] = medians["lmtool"] / medians["llama.cpp"]
    if args.json:
        print(json.dumps(report))
        return report
    print(f"{model} decode (llama.cpp {args.llama_type}, lmtool bfloat16 activations), {args.threads} threads, {args.tokens} tokens after a {args.prompt_len}-token "
          f"prompt, medians of {args.repeat} alternating rounds")
    for line in runtime_lines(report["runtime"]):
        print(f"  lmtool {line}")
    for name, summary in report["decode_tokens_per_s"].items():
        print(f"{name:<10} {summary['median']:7.2f} tok/s [{summary['min']:.2f}–{summary['max']:.2f}]")
    print(f"lmtool / llama.cpp: {report['ratio_lmtool_to_llama_cpp']:.2f}x; greedy tokens agreeing: "
          f"{report['greedy_tokens_agreeing']} of {args.tokens + 1}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
