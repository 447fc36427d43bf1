"""The bad-input corpus of issue 14 ("what a new user hit"): every case gives one line on stderr
naming the input and the problem and a documented exit code, never a traceback; Ctrl-C says how
far a run got."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM, GemmaForCausalLM

from lmtool.errors import ExitCode

from helpers import gemma_style_tokenizer, randomize, run_cli, save_hf, tiny_gemma_config
from test_tasks_fixtures import checkpoint

WINDOW = 48  # the tiny Gemma's max_position_embeddings


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> Path:
    model = randomize(GemmaForCausalLM(tiny_gemma_config(max_position_embeddings=WINDOW)))
    return save_hf(model, tmp_path_factory.mktemp("gemma"), gemma_style_tokenizer())


@pytest.fixture(scope="module")
def bloom(tmp_path_factory) -> Path:
    """A causal LM without a position limit (ALiBi)."""
    config = BloomConfig(vocab_size=120, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0, bos_token_id=2,
                         eos_token_id=1)
    return save_hf(randomize(BloomForCausalLM(config)), tmp_path_factory.mktemp("bloom"), gemma_style_tokenizer())


def one_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def lmtool_process(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmtool", *args], env=env, stderr=subprocess.PIPE, **kwargs)


def stdin_text(monkeypatch, data: bytes) -> None:
    """stdin as Python gives it to a process: bytes that are not UTF-8 become lone surrogates."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape"))


# --- text that is not UTF-8 (item 3) --------------------------------------------------------------

NOT_UTF8 = b"\xff\xfeBeautiful \xe9 is"


def test_generate_refuses_text_that_is_not_utf8(capsys, monkeypatch, gemma, tmp_path):
    code, out, err = run_cli(capsys, "generate", str(gemma), NOT_UTF8.decode("utf-8", "surrogateescape"), "-n", "2")
    assert code == ExitCode.ERROR and out == ""
    one_line(err, "PROMPT: not UTF-8 text (byte 0xff")
    stdin_text(monkeypatch, NOT_UTF8 + b"\n")
    code, _, err = run_cli(capsys, "generate", str(gemma), "-", "-n", "2")
    assert code == ExitCode.ERROR
    one_line(err, "stdin: not UTF-8 text")
    stdin_text(monkeypatch, b'{"prompt": "ok"}\n{"prompt": "' + NOT_UTF8 + b'"}\n')
    code, _, err = run_cli(capsys, "generate", str(gemma), "--prompts-file", "-", "-n", "2")
    assert code == ExitCode.ERROR
    one_line(err, "-:2: not UTF-8 text")


def test_classify_gives_an_error_record_for_text_that_is_not_utf8(capsys, monkeypatch):
    folder = checkpoint("gemma", "sequence-classification", "classes")
    bad = NOT_UTF8.decode("utf-8", "surrogateescape")
    code, out, err = run_cli(capsys, "classify", str(folder), "fine text", bad, "--json")
    records = [json.loads(line) for line in out.splitlines()]
    assert code == ExitCode.PARTIAL and "Traceback" not in err
    assert "label" in records[0] and records[1]["error_type"] == "encoding"
    qa = checkpoint("bloom", "question-answering")
    capsys.readouterr()  # what building the checkpoint printed
    code, _, err = run_cli(capsys, "qa", str(qa), "--question", bad, "--context", "Sarah did.")
    assert code == ExitCode.ERROR
    one_line(err, "--question: not UTF-8 text")
    stdin_text(monkeypatch, b'{"id": "a", "text": "fine"}\n{"id": "b", "text": "' + NOT_UTF8 + b'"}\n')
    code, out, err = run_cli(capsys, "classify", str(folder), "--jsonl", "-", "--json")
    records = [json.loads(line) for line in out.splitlines()]
    assert code == ExitCode.PARTIAL and [r.get("error_type") for r in records] == [None, "encoding"]


def test_a_byte_order_mark_is_not_text(capsys, tmp_path):
    folder = checkpoint("gemma", "token-classification")
    text = "Sarah works for Acme in Berlin."
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text(text, encoding="utf-8")
    marked.write_bytes(b"\xef\xbb\xbf" + text.encode())
    code, out, _ = run_cli(capsys, "tag", str(folder), str(plain), str(marked), "--json", "--ignore", "none")
    first, second = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    strip = lambda r: [(e["text"], e["label"], e["start"], e["end"]) for e in r["entities"]]  # noqa: E731
    assert strip(first) == strip(second) and all("\ufeff" not in e["text"] for e in second["entities"])


def test_a_byte_order_mark_does_not_spoil_a_list_or_jsonl_file(capsys, monkeypatch, tmp_path):
    folder = checkpoint("gemma", "sequence-classification", "classes")
    text = tmp_path / "a.txt"
    text.write_text("fine text")
    listing, lines = tmp_path / "list.txt", tmp_path / "items.jsonl"
    listing.write_bytes(b"\xef\xbb\xbf" + str(text).encode() + b"\n")
    lines.write_bytes(b'\xef\xbb\xbf{"id": "a", "text": "fine"}\n')
    for option, path, key in (("--files-from", listing, str(text)), ("--jsonl", lines, "a")):
        code, out, err = run_cli(capsys, "classify", str(folder), option, str(path), "--json")
        assert code == 0, err
        assert "label" in json.loads(out) and key in out
    stdin_text(monkeypatch, b'\xef\xbb\xbf{"id": "a", "text": "fine"}\n')
    code, out, err = run_cli(capsys, "classify", str(folder), "--jsonl", "-", "--json")
    assert code == 0 and "label" in json.loads(out), err


# --- one line instead of a traceback (item 4) ---------------------------------------------------


def test_a_huge_max_new_tokens_is_one_line(capsys, gemma, bloom):
    # Gemma has a window: -n is cut to it. BLOOM has none: a cache of 10^12 tokens cannot be made.
    code, out, err = run_cli(capsys, "generate", str(gemma), "Simple is", "-n", "1000000000", "--json",
                             "--ignore-eos", "--temperature", "0")
    assert code == 0 and "stopping at the context window (48 tokens)" in err
    record = json.loads(out)
    assert record["prompt_tokens"] + record["completion_tokens"] == WINDOW
    code, _, err = run_cli(capsys, "generate", str(bloom), "Simple is", "-n", "1000000000000", "--temperature", "0")
    assert code == ExitCode.ERROR
    one_line(err, "out of memory: could not allocate")


@pytest.mark.parametrize("device", ["mps", "cuda:7", "tpu"])
def test_an_unusable_device_is_one_line(capsys, gemma, device):
    code, _, err = run_cli(capsys, "generate", str(gemma), "hi", "--device", device)
    assert code in (ExitCode.ERROR, ExitCode.USAGE)
    assert "Traceback" not in err and device in err


def test_a_full_disk_is_one_line(capsys, gemma, tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    folder = checkpoint("gemma", "sequence-classification", "classes")
    capsys.readouterr()  # what building the checkpoint printed
    code, _, err = run_cli(capsys, "classify", str(folder), "some text", "-o", "/dev/full", "--force")
    assert code == ExitCode.ERROR
    one_line(err, "/dev/full", "No space left on device")
    with open("/dev/full", "w") as full:
        proc = lmtool_process("generate", str(gemma), "hi", "-n", "3", "--temperature", "0", stdout=full)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.ERROR
    one_line(err.decode(), "stdout", "No space left on device")


def test_files_from_a_binary_file_is_one_line(capsys, tmp_path):
    folder = checkpoint("gemma", "token-classification")
    binary = tmp_path / "list.bin"
    binary.write_bytes(b"\x7fELF\x02\x01\x00\x00 a/b \x00\n")
    code, _, err = run_cli(capsys, "tag", str(folder), "--files-from", str(binary))
    assert code == ExitCode.ERROR
    one_line(err, str(binary), "binary")
    binary.write_bytes(b"\xff\xfe\x00a\n")
    code, _, err = run_cli(capsys, "tag", str(folder), "--files-from", str(binary))
    assert code == ExitCode.ERROR and "Traceback" not in err and str(binary) in err


def test_ctrl_c_during_start_up_is_one_line():
    launcher = "from lmtool.launcher import main; main()"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", launcher, "inspect", "lmtool/demo/zen-gemma"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.3)  # still importing
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the command finished before the signal arrived")
    assert proc.returncode == ExitCode.INTERRUPTED
    one_line(err.decode(), "interrupted")


# --- the context window (item 5) ----------------------------------------------------------------


def test_a_prompt_that_fills_the_window_is_refused(capsys, gemma):
    code, out, err = run_cli(capsys, "generate", str(gemma), "Simple is better. " * 40, "-n", "2", "--temperature", "0")
    assert code == ExitCode.ERROR and out == ""
    one_line(err, str(gemma), "context window is 48")


def test_bloom_has_no_window_to_stop_at(capsys, bloom):
    code, out, err = run_cli(capsys, "generate", str(bloom), "Simple is better. " * 10, "-n", "60", "--json",
                             "--ignore-eos", "--temperature", "0")
    assert code == 0 and json.loads(out)["completion_tokens"] == 60 and "context window" not in err


# --- the head a checkpoint holds (item 6) -------------------------------------------------------


def test_a_token_classifier_is_not_a_sequence_classifier(capsys, tmp_path):
    folder = checkpoint("gemma", "token-classification")
    code, out, err = run_cli(capsys, "classify", str(folder), "Sarah works for Acme")
    assert code == ExitCode.UNSUPPORTED and out == ""
    one_line(err, "holds a token-classification head", "lmtool tag")
    code, out, _ = run_cli(capsys, "inspect", str(folder), "--json")
    described = json.loads(out)
    assert described["heads"] == ["token-classification"] and described["tied_embeddings"] is False

    # Without architectures the tensors decide: `score` with a bias is a token classifier; and a
    # config that names the wrong head is refused for the tensor that head does not use.
    for architectures, message in ((None, "holds a token-classification head"),
                                   (["GemmaForSequenceClassification"], "'score.bias' is not part of")):
        copy = tmp_path / f"copy-{bool(architectures)}"
        copy.mkdir()
        for f in folder.iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
        config = json.loads((copy / "config.json").read_text())
        config.pop("architectures")
        if architectures:
            config["architectures"] = architectures
        (copy / "config.json").write_text(json.dumps(config))
        code, _, err = run_cli(capsys, "classify", str(copy), "Sarah works for Acme")
        assert code in (ExitCode.UNSUPPORTED, ExitCode.ERROR)
        one_line(err, message)


def test_a_sequence_classifier_has_no_tied_embeddings(capsys):
    code, out, _ = run_cli(capsys, "inspect", str(checkpoint("gemma", "sequence-classification", "classes")), "--json")
    described = json.loads(out)
    assert code == 0 and described["heads"] == ["sequence-classification"] and described["tied_embeddings"] is False


# --- Ctrl-C (item 8) ----------------------------------------------------------------------------


def test_ctrl_c_in_generate_ends_the_line_and_reports(bloom):
    proc = lmtool_process("generate", str(bloom), "Simple is", "-n", "100000", "--ignore-eos", "--temperature", "0",
                          stdout=subprocess.PIPE)
    assert proc.stdout.read(1)  # text is streaming
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.INTERRUPTED
    assert out.endswith(b"\n")
    one_line(err.decode(), "interrupted: ", "tokens generated")


def test_ctrl_c_in_tag_reports_how_far_it_got_and_how_to_go_on(tmp_path, capsys):
    folder = checkpoint("gemma", "token-classification")
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"id": i, "text": f"Sarah {i} works for Acme in Berlin."}) + "\n"
                             for i in range(3000)))
    output = tmp_path / "tags.jsonl"
    proc = lmtool_process("tag", str(folder), "--jsonl", str(texts), "-o", str(output), "--batch-size", "1")
    deadline = time.monotonic() + 120
    while not (output.exists() and output.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.INTERRUPTED
    one_line(err.decode(), "tag: interrupted after", "--resume continues")
    done = int(err.decode().split("interrupted after ")[1].split(" done")[0])
    assert 0 < done < 3000


# --- exit codes as the README's table says (item 9) ---------------------------------------------


def test_convert_of_a_missing_source_exits_3(capsys, tmp_path):
    code, _, err = run_cli(capsys, "convert", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert code == ExitCode.NOT_FOUND
    one_line(err, "no such file or folder")


def test_inspect_of_a_config_only_folder_does_not_mention_from(capsys, tmp_path):
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma"}))
    code, _, err = run_cli(capsys, "inspect", str(folder))
    assert code in (ExitCode.ERROR, ExitCode.UNSUPPORTED)
    one_line(err, str(folder), "but no weights")
    assert "--from" not in err


# --- -o does not overwrite (item 10) ------------------------------------------------------------


def test_output_file_is_not_overwritten_without_force(capsys, tmp_path):
    folder = checkpoint("gemma", "sequence-classification", "classes")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    code, _, err = run_cli(capsys, "classify", str(folder), "some text", "-o", str(notes))
    assert code == ExitCode.ERROR and notes.read_text() == "my notes\n"
    one_line(err, str(notes), "already exists", "--force")
    code, _, _ = run_cli(capsys, "classify", str(folder), "some text", "-o", str(notes), "--force")
    assert code == 0 and "label" in json.loads(notes.read_text())


# --- rough edges ----------------------------------------------------------------------------------


def test_several_plain_completions_can_be_split(capsys, gemma, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Simple is"}\n{"prompt": "Flat is"}\n')
    code, out, _ = run_cli(capsys, "generate", str(gemma), "--prompts-file", str(prompts), "-n", "3",
                           "--temperature", "0")
    assert code == 0
    assert [line for line in out.splitlines() if line.startswith("==> ")] == ["==> a <==", "==> 2 <=="]


def test_threads_default_to_one_for_a_tiny_model(capsys, gemma):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert run_cli(capsys, "generate", str(gemma), "hi", "-n", "1")[0] == 0
        assert torch.get_num_threads() == 1
        assert run_cli(capsys, "generate", str(gemma), "hi", "-n", "1", "--threads", "2")[0] == 0
        assert torch.get_num_threads() == 2
        code, _, err = run_cli(capsys, "generate", str(gemma), "hi", "--threads", "0")
        assert code == ExitCode.USAGE
    finally:
        torch.set_num_threads(before)


def test_qa_doc_stride_must_be_less_than_the_window(capsys):
    folder = checkpoint("bloom", "question-answering")
    capsys.readouterr()  # what building the checkpoint printed
    code, _, err = run_cli(capsys, "qa", str(folder), "--question", "Who?", "--context", "Sarah did.",
                           "--doc-stride", "600", "--max-length", "64")
    assert code == ExitCode.ERROR
    one_line(err, "--doc-stride 600 must be less than the window (64 tokens)")
    long_context = "Sarah works for Acme in Berlin. " * 20
    code, out, _ = run_cli(capsys, "qa", str(folder), "--question", "Where does Sarah work?", "--context",
                           long_context, "--doc-stride", "60", "--max-length", "64", "--json")
    assert code == ExitCode.PARTIAL and "--doc-stride 60 must be less than" in json.loads(out)["error"]
