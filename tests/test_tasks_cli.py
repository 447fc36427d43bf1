"""The classify, tag and qa commands in batch mode: inputs, error records, order, exit codes, --resume."""

from __future__ import annotations

import io
import json
import sys

import pytest

import lmtool
import lmtool.tasks.batching as batching
from lmtool.errors import ExitCode
from lmtool.tasks import Item, Tagger, run_task
from lmtool.tasks.windows import pad_id
from helpers import run_cli
from test_tasks_fixtures import checkpoint, needs_bloom

GOOD = [
    "Sarah is from Berlin and works for Acme Corporation.",
    "Wolfgang works for Acme in Berlin.",
    "Clara visited Zürich and 東京 last summer.",
    "Sarah lives in Berlin, Germany.",
]


def cli(args: list[str], capsys, stdin: bytes | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    return run_cli(capsys, *args)


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def tag_alone(folder, text: str) -> list[dict]:
    lm = lmtool.load(folder)
    records: list[dict] = []
    run_task(Tagger(lm), [Item(0, text=text)], lm.model, pad_id=pad_id(lm.tokenizer), batch_size=1, emit=records.append)
    return records[0]["entities"]


def same_entities(a: list[dict], b: list[dict]) -> bool:
    strip = lambda es: [(e["text"], e["label"], e["start"], e["end"]) for e in es]  # noqa: E731
    return strip(a) == strip(b) and all(abs(x["score"] - y["score"]) < 1e-5 for x, y in zip(a, b))


@pytest.fixture()
def folder_of_files(tmp_path):
    """Good files with bad ones between them: binary, empty, missing, not UTF-8."""
    paths = []
    for i, text in enumerate(GOOD):
        path = tmp_path / f"good{i}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(str(path))
    (tmp_path / "binary.bin").write_bytes(b"\x7fELF\x00\x01\x02 not text")
    (tmp_path / "empty.txt").write_bytes(b"  \n")
    (tmp_path / "latin1.txt").write_bytes("Zürich café".encode("latin-1"))
    bad = {
        str(tmp_path / "binary.bin"): "binary", str(tmp_path / "empty.txt"): "empty",
        str(tmp_path / "missing.txt"): "missing", str(tmp_path / "latin1.txt"): "encoding",
    }
    order = [paths[0], *list(bad)[:2], paths[1], paths[2], *list(bad)[2:], paths[3]]
    return order, bad


def test_tag_batch_of_files_with_bad_ones(tmp_path, capsys, monkeypatch, folder_of_files):
    order, bad = folder_of_files
    folder = checkpoint("gemma", "token-classification")
    listing = "\n".join(order) + "\n"
    args = ["tag", str(folder), "--files-from", "-", "--batch-size", "3"]
    code, out, err = cli(args, capsys, listing.encode(), monkeypatch)
    assert code == ExitCode.PARTIAL
    records = jsonl(out)
    assert [r["path"] for r in records] == order
    for path, record in zip(order, records):
        if path in bad:
            assert record["error_type"] == bad[path] and path in record["error"]
        else:
            text = open(path, encoding="utf-8").read()
            assert same_entities(record["entities"], tag_alone(folder, text))
    assert "4 done, 4 failed" in err


def test_all_good_exits_zero_and_text_arguments_keep_their_order(capsys):
    folder = checkpoint("gemma", "sequence-classification", "classes")
    code, out, err = cli(["classify", str(folder), *GOOD, "--top-k", "2", "--batch-size", "2"], capsys)
    assert code == 0
    records = jsonl(out)
    assert [r["id"] for r in records] == [1, 2, 3, 4]
    assert all(len(r["labels"]) == 2 and r["labels"][0]["label"] == r["label"] for r in records)
    # Sorting by length for the batches must not change any result.
    code, alone, _ = cli(["classify", str(folder), *GOOD, "--top-k", "2", "--batch-size", "1"], capsys)
    for a, b in zip(records, jsonl(alone)):
        assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_resume_does_not_redo_work(tmp_path, capsys, monkeypatch, folder_of_files):
    order, bad = folder_of_files
    folder = checkpoint("gemma", "token-classification")
    output = tmp_path / "tags.jsonl"
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(order) + "\n")
    args = ["tag", str(folder), "--files-from", str(listing), "--output", str(output)]
    assert cli(args, capsys)[0] == ExitCode.PARTIAL
    full = output.read_text().splitlines()
    # An interrupted run: four records written (two of them errors), the fifth cut short.
    output.write_text("\n".join(full[:4]) + "\n" + full[4][:10])
    (tmp_path / "empty.txt").write_text("Wolfgang lives in Berlin.")  # fixed since: runs again
    seen: list[list[int]] = []
    real = batching.run_model

    def spy(model, sequences, *a, **k):
        seen.extend(sequences)
        return real(model, sequences, *a, **k)

    monkeypatch.setattr(batching, "run_model", spy)
    code, out, err = cli(args + ["--resume"], capsys)
    assert code == ExitCode.PARTIAL and out == ""
    records = jsonl(output.read_text())
    keys = [r["path"] for r in records]
    assert sorted(keys) == sorted(order) and len(set(keys)) == len(keys)
    finished_before = [json.loads(line)["path"] for line in full[:4] if "error" not in json.loads(line)]
    assert keys[: len(finished_before)] == finished_before
    redone = [p for p in order if p not in finished_before]
    assert len(seen) == sum(p not in bad or p.endswith("empty.txt") for p in redone)
    assert "already in" in err
    again = {r["path"]: r for r in records}
    assert "entities" in again[str(tmp_path / "empty.txt")]


def test_resume_refuses_a_file_that_is_not_its_output(tmp_path, capsys):
    folder = checkpoint("gemma", "token-classification")
    output = tmp_path / "notes.txt"
    output.write_text("my notes\nmore notes\n")
    code, _, err = cli(["tag", str(folder), "hello", "--output", str(output), "--resume"], capsys)
    assert code == ExitCode.ERROR and "not a JSON record" in err and len(err.strip().splitlines()) == 1
    assert output.read_text() == "my notes\nmore notes\n"


def test_jsonl_input_with_a_bad_line_and_stdin_text(capsys, monkeypatch, tmp_path):
    folder = checkpoint("gemma", "token-classification")
    lines = [
        json.dumps({"id": "a", "text": GOOD[0]}), "{not json", json.dumps({"id": "c", "body": "x"}),
        json.dumps({"id": 7, "text": GOOD[1]}),
    ]
    code, out, _ = cli(["tag", str(folder), "--jsonl", "-", "--aggregation", "first"], capsys,
                       ("\n".join(lines) + "\n").encode(), monkeypatch)
    records = jsonl(out)
    assert code == ExitCode.PARTIAL
    assert [r["id"] for r in records] == ["a", 2, "c", 7]
    assert [r.get("error_type") for r in records] == [None, "invalid", "invalid", None]
    code, out, _ = cli(["tag", str(folder), "-"], capsys, GOOD[2].encode(), monkeypatch)
    assert code == 0 and jsonl(out)[0]["id"] == "-"
    assert same_entities(jsonl(out)[0]["entities"], tag_alone(folder, GOOD[2]))


def test_path_like_arguments_that_do_not_exist_are_missing_files(capsys, tmp_path):
    folder = checkpoint("gemma", "token-classification")
    code, out, _ = cli(["tag", str(folder), "notes/today.txt", "plain words", str(tmp_path / "gone")], capsys)
    records = jsonl(out)
    assert code == ExitCode.PARTIAL
    assert [r.get("error_type") for r in records] == ["missing", None, "missing"]
    assert records[1]["id"] == 2
    code, out, _ = cli(["tag", str(folder), "--text", "notes/today.txt"], capsys)
    assert code == 0 and jsonl(out)[0]["id"] == 1


def test_terminal_gets_a_table(capsys, monkeypatch):
    folder = checkpoint("gemma", "token-classification")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, _ = cli(["tag", str(folder), GOOD[0], "--json"], capsys)
    entities = jsonl(out)[0]["entities"]
    assert code == 0 and entities
    code, out, _ = cli(["tag", str(folder), GOOD[0], ""], capsys)
    assert code == ExitCode.PARTIAL
    assert not out.lstrip().startswith("{") and "error: 2: empty input" in out
    for e in entities:
        assert f"{e['start']}-{e['end']}" in out and e["text"] in out


def test_usage_errors_are_one_line(capsys):
    folder = checkpoint("gemma", "token-classification")
    for args in (["--resume"], ["--stride", "999", "--max-length", "16"]):
        code, out, err = cli(["tag", str(folder), "text", *args], capsys)
        assert code == ExitCode.ERROR and out == "" and len(err.strip().splitlines()) == 1, (args, err)
    # An unknown choice is a usage error (exit 2) that lists the choices.
    code, out, err = cli(["tag", str(folder), "text", "--aggregation", "longest"], capsys)
    assert code == 2 and out == "" and "'longest' is not one of none, simple, first, average, max" in err


@needs_bloom
def test_qa_jsonl_and_context_file(capsys, tmp_path, monkeypatch):
    folder = checkpoint("bloom", "question-answering")
    context = tmp_path / "context.txt"
    context.write_text(" ".join(GOOD))
    code, out, _ = cli(["qa", str(folder), "--question", "Where does Sarah live?", "--context-file", str(context),
                        "--top-k", "2"], capsys)
    (record,) = jsonl(out)
    assert code == 0 and record["path"] == str(context) and len(record["answers"]) == 2
    assert context.read_text()[record["start"] : record["end"]] == record["answer"]
    lines = [json.dumps({"id": "q1", "question": "Who lives in Berlin?", "context": GOOD[3]}),
             json.dumps({"id": "q2", "context": GOOD[1]})]
    code, out, _ = cli(["qa", str(folder), "--jsonl", "-", "--question", "Who works?", "--allow-empty"], capsys,
                       ("\n".join(lines)).encode(), monkeypatch)
    records = jsonl(out)
    assert code == 0 and [r["question"] for r in records] == ["Who lives in Berlin?", "Who works?"]
    assert all(isinstance(r["no_answer"], bool) for r in records)
