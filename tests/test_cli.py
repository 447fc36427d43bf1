"""The shell contract: stdout carries results, errors are one line with a documented exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import GemmaForCausalLM

from lmtool.errors import ExitCode

from helpers import gemma_style_tokenizer, randomize, run_cli, save_hf, tiny_gemma_config


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-gemma")
    return save_hf(randomize(GemmaForCausalLM(tiny_gemma_config())), folder, gemma_style_tokenizer())


def test_generate_json_is_the_only_thing_on_stdout(capsys, tiny_model):
    code, out, err = run_cli(
        capsys, "generate", str(tiny_model), "The quick", "--temperature", "0", "-n", "5", "--json", "--ignore-eos"
    )
    assert code == 0, err
    record = json.loads(out)
    assert record["prompt"] == "The quick"
    assert record["completion_tokens"] == 5 == len(record["token_ids"])
    assert record["finish_reason"] == "length"
    assert record["prompt_tokens"] >= 2 and "seed" in record and record["timings"]["decode_s"] >= 0


def test_prompts_file_batches_and_keeps_order(capsys, tiny_model, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": i, "prompt": p}) for i, p in enumerate(["a", "The quick brown", "Zü"])))
    code, out, _ = run_cli(capsys, "generate", str(tiny_model), "--prompts-file", str(prompts), "--temperature", "0",
                       "-n", "4", "--json", "--batch-size", "2")
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in records] == [0, 1, 2]
    # Batched left-padded generation equals generating each prompt alone.
    for r in records:
        code, alone, _ = run_cli(capsys, "generate", str(tiny_model), r["prompt"], "--temperature", "0", "-n", "4", "--json")
        assert json.loads(alone)["token_ids"] == r["token_ids"]


@pytest.mark.parametrize("setup, code, message", [
    (lambda p: None, ExitCode.NOT_FOUND, "no such file or folder"),
    (lambda p: p.mkdir(), ExitCode.ERROR, "no config.json"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{oops")), ExitCode.ERROR, "not valid JSON"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text('{"model_type": "llama"}')), ExitCode.UNSUPPORTED,
     "'llama' is not supported; lmtool supports: "),
    (lambda p: (p.mkdir(), (p / "config.json").write_text('{"model_type": "gemma"}')), ExitCode.ERROR,
     "no model.safetensors"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text('{"model_type": "gemma", "head_dim": "x"}')),
     ExitCode.ERROR, "'head_dim' should be int"),
])
def test_bad_model_folders_fail_in_one_line(capsys, tmp_path, setup, code, message):
    target = tmp_path / "model"
    setup(target)
    got, out, err = run_cli(capsys, "generate", str(target), "hi")
    assert got == code
    assert out == ""
    assert message in err and str(target) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_truncated_weights_are_reported(capsys, tiny_model, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "generate", str(broken), "hi")
    assert code == ExitCode.ERROR and "truncated" in err and "model.safetensors" in err


def test_usage_errors_exit_2(capsys, tiny_model):
    code, _, err = run_cli(capsys, "generate", str(tiny_model), "hi", "--no-such-flag")
    assert code == ExitCode.USAGE and "No such option" in err
    code, _, err = run_cli(capsys, "generate", str(tiny_model), "hi", "--system", "be brief")
    assert code == ExitCode.ERROR and "--system needs --chat" in err


def test_debug_shows_the_traceback_and_keeps_the_exit_code(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--debug", "inspect", str(tmp_path / "missing"))
    assert code == ExitCode.NOT_FOUND
    assert "Traceback" in err and "no such file or folder" in err


def test_stdin_prompt_and_real_entry_point(tiny_model):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lmtool", "generate", str(tiny_model), "-", "--temperature", "0", "-n", "3",
         "--json", "--ignore-eos"],
        input="The quick", capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["prompt"] == "The quick"


def test_inspect_json_describes_the_checkpoint(capsys, tiny_model):
    code, out, _ = run_cli(capsys, "inspect", str(tiny_model), "--json", "--tensors")
    assert code == 0
    info = json.loads(out)
    assert info["family"] == "gemma" and info["architecture"] == "GemmaForCausalLM"
    assert info["heads"] == ["causal-lm"] and info["tied_embeddings"] is True
    assert info["parameters"] == sum(t_numel(t["shape"]) for t in info["tensors"])
    assert info["tokenizer"]["bos"] == 2
    assert "model.layers.0" in info["blocks"]


def t_numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def test_inspect_single_safetensors_file(capsys, tiny_model):
    code, out, _ = run_cli(capsys, "inspect", str(tiny_model / "model.safetensors"), "--json")
    assert code == 0 and json.loads(out)["format"] == "safetensors"


def test_chat_format_and_system_message():
    from lmtool.families.gemma.chat import format_chat

    assert format_chat([{"role": "user", "content": " Hello "}]) == (
        "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"
    )
    text = format_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text.startswith("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n")


def test_chat_generation_runs(capsys, tiny_model):
    code, out, err = run_cli(capsys, "generate", str(tiny_model), "Hi", "--chat", "--system", "Be brief.",
                         "--temperature", "0", "-n", "3", "--json")
    assert code == 0, err
    assert json.loads(out)["prompt_tokens"] > 10  # the turn markup was added
