"""Data-parallel runs on torchrun (lmtool.distributed): two CPU ranks over gloo must leave OUT exactly
as a single-process run writes it, also across a killed worker, a restart and a plain --resume."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lmtool import distributed
from lmtool.errors import ExitCode, LmtoolError
from helpers import run_cli
from test_tasks_cli import folder_of_files, same_entities  # noqa: F401 (a fixture)
from test_tasks_fixtures import checkpoint

TESTS = Path(__file__).parent
TIMEOUT_S = 180


def torchrun(launch: list[str], command: list[str], *, stdin: bytes | None = None, env: dict | None = None,
             script: str | None = None) -> subprocess.CompletedProcess:
    """`torchrun LAUNCH -m lmtool COMMAND` (or LAUNCH SCRIPT COMMAND) as a user types it."""
    entry = [script] if script else ["-m", "lmtool"]
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *launch, *entry, *command],
        input=stdin or b"", capture_output=True, timeout=TIMEOUT_S, env=worker_env(env),
    )


def worker_env(extra: dict | None = None) -> dict:
    path = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **(extra or {})}


ONE_NODE = ["--standalone", "--nproc-per-node", "2"]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_same_records(got: Path, expected: Path) -> None:
    """Record for record: keys in input order, the same errors, the same entities."""
    mine, reference = read(got), read(expected)
    assert [r["path"] for r in mine] == [r["path"] for r in reference]
    for a, b in zip(mine, reference):
        if "error" in b:
            assert (a["error_type"], a["error"]) == (b["error_type"], b["error"])
        else:
            assert same_entities(a["entities"], b["entities"])
    assert not distributed.parts_dir(got).exists()


@pytest.fixture()
def job(tmp_path, capsys, folder_of_files):  # noqa: F811
    """The model, the list of inputs (good and bad files) and the single-process output."""
    order, _ = folder_of_files
    listing = tmp_path / "list.txt"
    listing.write_text("".join(p + "\n" for p in order))
    model = str(checkpoint("gemma", "token-classification"))
    reference = tmp_path / "reference.jsonl"
    code, _, _ = run_cli(capsys, "tag", model, "--files-from", str(listing), "-o", str(reference))
    assert code == ExitCode.PARTIAL  # the bad files
    return model, listing, reference


def test_two_ranks_reading_stdin_write_what_one_process_writes(job, tmp_path):
    model, listing, reference = job
    output = tmp_path / "tags.jsonl"
    run = torchrun(ONE_NODE, ["tag", model, "--files-from", "-", "-o", str(output), "--batch-size", "2"],
                   stdin=listing.read_bytes())
    err = run.stderr.decode()
    assert run.returncode == 0, err  # a completed run exits 0 even with error records
    assert_same_records(output, reference)
    assert b"{" not in run.stdout  # records go to -o only
    assert "tag: 4 done, 4 failed" in err and "[rank 1/2]" in err


def test_two_agents_as_two_nodes(job, tmp_path):
    model, listing, reference = job
    output = tmp_path / "tags.jsonl"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes"]

    def command(is_host: bool) -> list[str]:
        # Which agent hosts the rendezvous store is said, not left to both agents' guess from the
        # endpoint's address (both on this machine would race to bind the port).
        conf = ["--rdzv-conf", f"is_host={str(is_host).lower()}"]
        return [sys.executable, "-m", "torch.distributed.run", *launch, *conf, "-m", "lmtool",
                "tag", model, "--files-from", str(listing), "-o", str(output)]

    agents = [subprocess.Popen(command(is_host), env=worker_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE) for is_host in (True, False)]
    try:
        results = [agent.communicate(timeout=TIMEOUT_S) for agent in agents]
    except subprocess.TimeoutExpired:
        for agent in agents:
            agent.kill()
        results = [agent.communicate() for agent in agents]
        pytest.fail(f"an agent ran past {TIMEOUT_S} s: " + " | ".join(r[1].decode()[-3000:] for r in results))
    assert [agent.returncode for agent in agents] == [0, 0], [r[1].decode()[-2000:] for r in results]
    assert_same_records(output, reference)


def test_a_killed_worker_is_restarted_and_its_finished_records_kept(job, tmp_path):
    model, listing, reference = job
    output = tmp_path / "tags.jsonl"
    run = torchrun([*ONE_NODE, "--max-restarts", "1"], ["tag", model, "--files-from", str(listing), "-o", str(output)],
                   env={"CRASH_AFTER": "1:2"}, script=str(TESTS / "distributed_crash.py"))
    err = run.stderr.decode()
    assert run.returncode == 0, err
    assert_same_records(output, reference)
    # The second attempt did not redo what the first finished (rank 1's good file among its two).
    done, failed, kept = summary_counts(err)
    assert kept >= 1 and done + failed + kept == 8, err


def summary_counts(err: str) -> tuple[int, int, int]:
    """(done, failed, already in OUT) from the last summary line."""
    line = [line for line in err.splitlines() if line.startswith("tag: ")][-1]
    match = re.match(r"tag: (\d+) done, (\d+) failed.*?(?:, (\d+) already in .*)?;", line)
    return int(match[1]), int(match[2]), int(match[3] or 0)


def test_a_crashed_run_is_finished_by_a_plain_resume(job, tmp_path, capsys):
    model, listing, reference = job
    output = tmp_path / "tags.jsonl"
    command = ["tag", model, "--files-from", str(listing), "-o", str(output)]
    run = torchrun(ONE_NODE, command, env={"CRASH_AFTER": "1:2"}, script=str(TESTS / "distributed_crash.py"))
    assert run.returncode != 0
    parts = distributed.parts_dir(output)
    assert len(read(parts / "rank-00001-attempt-0.jsonl")) == 2  # what rank 1 wrote before it died
    code, out, err = run_cli(capsys, *command, "--resume")  # one process finishes what two began
    assert code == ExitCode.PARTIAL and out == ""  # single-process: exit 5 for failed items
    assert_same_records(output, reference)
    assert "already in" in err


def test_two_ranks_resume_what_one_process_began(job, tmp_path):
    model, listing, reference = job
    output = tmp_path / "tags.jsonl"
    lines = reference.read_text().splitlines(keepends=True)
    output.write_text(lines[3] + lines[0] + lines[5][:15])  # an interrupted run: two records, one torn
    run = torchrun(ONE_NODE, ["tag", model, "--files-from", str(listing), "-o", str(output), "--resume"])
    assert run.returncode == 0, run.stderr.decode()
    assert_same_records(output, reference)  # and back in input order
    done, failed, kept = summary_counts(run.stderr.decode())
    assert kept == sum("error" not in json.loads(lines[i]) for i in (0, 3)) and done + failed + kept == 8


# --- the merge, without torchrun -----------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(lines), encoding="utf-8")


def test_merge_orders_by_input_position_and_keeps_foreign_records_first(tmp_path):
    output = tmp_path / "out.jsonl"
    write_lines(output, ['{"id": "old"}\n', '{"id": "b", "v": 1}\n'])
    parts = distributed.parts_dir(output)
    parts.mkdir()
    write_lines(parts / "rank-00001-attempt-0.jsonl", ['{"id": "c", "_i": 2}\n', '{"id": "a", "_i": 3}\n'])
    write_lines(parts / "rank-00000-attempt-0.jsonl", ['{"id": "a", "_i": 0}\n', '{"id": "c", "_i": 4}\n{"id"'])
    distributed.merge_output(output, ["a", "b", "c", "a", "c"])
    assert read(output) == [{"id": "old"}, {"id": "a"}, {"id": "b", "v": 1}, {"id": "c"}, {"id": "a"}, {"id": "c"}]
    assert not parts.exists()


def test_fold_then_merge_after_a_crash_between_replace_and_clean_up(tmp_path):
    """Records both in OUT and in a part (the merge replaced OUT, then died) end up once."""
    output = tmp_path / "out.jsonl"
    write_lines(output, ['{"id": "a"}\n', '{"id": "b"}\n'])
    parts = distributed.parts_dir(output)
    parts.mkdir()
    write_lines(parts / "rank-00000-attempt-0.jsonl", ['{"id": "b", "_i": 1}\n'])
    distributed.fold_parts(output)
    assert not parts.exists() and [r["id"] for r in read(output)] == ["a", "b", "b"]
    distributed.merge_output(output, ["a", "b"])
    assert read(output) == [{"id": "a"}, {"id": "b"}]


def test_world_from_torchrun_environment_and_its_rules():
    world = distributed.detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                                "TORCHELASTIC_RESTART_COUNT": "1"})
    assert (world.rank, world.size, world.local_rank, world.local_size, world.restart) == (3, 4, 1, 2, 1)
    assert not distributed.detect({}).distributed
    with pytest.raises(LmtoolError, match="several nodes"):
        distributed.stdin_check(world, uses_stdin=True)
    with pytest.raises(LmtoolError, match="-o/--output"):
        distributed.require_output(world, None)
    assert distributed.threads_for(world, None) == max(1, (os.cpu_count() or 1) // 2)
    assert distributed.threads_for(world, 3) == 3
    with pytest.raises(LmtoolError, match="WORLD_SIZE"):
        distributed.detect({"RANK": "2", "WORLD_SIZE": "2"})


# --- generate --prompts-file --------------------------------------------------------------------

DEMO = str(Path(__file__).parent.parent / "lmtool" / "demo" / "zen-gemma")
SAMPLING = ["--temperature", "1.5", "--top-k", "0", "--top-p", "1", "--min-p", "0", "-n", "6", "--seed", "7"]


@pytest.fixture()
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(
        json.dumps({"prompt": f"Line {i} of the zen is", **({"id": f"p{i}"} if i % 2 else {})}) + "\n" for i in range(6)
    ))
    return path


def generated(path: Path) -> list[tuple]:
    return [(r["id"], r["seed"], r["token_ids"], r["text"]) for r in read(path)]


def test_generate_split_over_two_ranks_samples_what_one_process_samples(prompts, tmp_path, capsys):
    reference = tmp_path / "reference.jsonl"
    code, out, _ = run_cli(capsys, "generate", DEMO, "--prompts-file", str(prompts), *SAMPLING, "--batch-size", "4",
                           "-o", str(reference))
    assert code == 0 and out == ""
    records = generated(reference)
    assert [r[:2] for r in records] == [(1, 7), ("p1", 8), (3, 9), ("p3", 10), (5, 11), ("p5", 12)]
    assert len({r[3] for r in records}) > 1  # sampled, not the same text six times
    output = tmp_path / "split.jsonl"
    run = torchrun(ONE_NODE, ["generate", DEMO, "--prompts-file", "-", *SAMPLING, "--batch-size", "2",
                              "-o", str(output)], stdin=prompts.read_bytes())
    assert run.returncode == 0, run.stderr.decode()
    assert generated(output) == records and not distributed.parts_dir(output).exists()
    # A prompt's text is the text of that prompt alone with the seed its record names.
    code, out, _ = run_cli(capsys, "generate", DEMO, "Line 2 of the zen is", *SAMPLING[:-1], "9", "--json")
    assert json.loads(out)["token_ids"] == records[2][2]


def test_generate_resume_runs_only_the_missing_prompts(prompts, tmp_path, capsys):
    output = tmp_path / "out.jsonl"
    command = ["generate", DEMO, "--prompts-file", str(prompts), *SAMPLING, "-o", str(output)]
    assert run_cli(capsys, *command)[0] == 0
    reference = tmp_path / "reference.jsonl"
    reference.write_text(output.read_text())
    full = output.read_text().splitlines(keepends=True)
    output.write_text(full[0] + full[3] + full[4][:20])  # two finished, one torn
    code, _, err = run_cli(capsys, *command, "--resume")
    assert code == 0 and "4 prompts done, 2 already in" in err
    assert generated(output) == generated(reference)
    assert run_cli(capsys, *command)[0] != 0  # without --resume or --force an existing file is refused


def test_under_torchrun_output_is_required(tmp_path):
    run = torchrun(ONE_NODE, ["generate", DEMO, "--prompts-file", "-", "-n", "2"], stdin=b'{"prompt": "Hi"}\n')
    assert run.returncode != 0
    assert "give -o/--output FILE" in run.stderr.decode()
