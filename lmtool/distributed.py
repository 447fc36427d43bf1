"""Data-parallel batch runs on torchrun: the one place that knows about ranks.

torchrun (torch.distributed elastic) starts the processes, does the rendezvous, forwards signals
and restarts a failed group; lmtool only reads the environment it sets. Each rank takes a strided
share of the inputs still to do and writes its records, each tagged with its input position
("_i"), to its own part file in OUT.parts/, flushed per record. When every rank is done, rank 0
merges OUT and the parts into OUT in input order (a temporary file renamed into place) and
removes the parts. Progress is therefore kept per record, and resuming is keyed by record, never
by rank: a restarted group (torchrun --max-restarts), or a plain --resume with any number of
ranks or none, folds the parts left by a crash into OUT and runs what is missing.

The process group is gloo even for CUDA ranks: the ranks only exchange small Python objects
(the input list, the work left, the counts), never tensors.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
from collections import defaultdict, deque
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from .errors import LmtoolError
from .tasks.records import JsonlWriter, read_lines, record_key, resume_keys

# A rank that finishes early waits at the final barrier for the slowest; gloo's default 30 minute
# timeout would fail a long unbalanced job. A dead worker is still caught: torchrun's agent stops
# the group when one exits.
DEFAULT_TIMEOUT_S = 24 * 3600
POSITION = "_i"  # the input position a part-file record belongs to


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job; the default is a single-process run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    restart: int = 0  # TORCHELASTIC_RESTART_COUNT: > 0 when torchrun restarted the group

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def one_node(self) -> bool:
        return self.size == self.local_size

    def log(self, message: str) -> None:
        """A line on stderr prefixed with the rank; nothing for a single process, whose summary
        line says it all."""
        if self.distributed:
            print(f"[rank {self.rank}/{self.size}] {message}", file=sys.stderr, flush=True)


@contextmanager
def _with_the_others(world: World):
    """A collective call; when another rank has died, one line instead of gloo's traceback (torchrun
    then stops or restarts the group)."""
    try:
        yield
    except RuntimeError as exc:  # torch.distributed.DistError and gloo's errors
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LmtoolError(f"rank {world.rank}: lost contact with the other ranks ({reason})") from None


def detect(environ: dict | None = None) -> World:
    """The world torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, ...)."""
    environ = os.environ if environ is None else environ
    try:
        size = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", "0"))
        local_size = int(environ.get("LOCAL_WORLD_SIZE", str(size)))
        restart = int(environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        raise LmtoolError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers") from None
    if size < 1 or not 0 <= rank < size:
        raise LmtoolError(f"RANK {rank} is not within WORLD_SIZE {size}")
    return World(rank, size, local_rank, local_size, restart)


def start(world: World) -> None:
    """Join the job's gloo process group (no-op for a single process)."""
    if not world.distributed:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        return
    timeout = timedelta(seconds=float(os.environ.get("LMTOOL_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    # torchrun's agent keeps one TCPStore across restarts of the group (torch 2.13), and a
    # restarted group that meets in it finds the gloo addresses of the workers it replaced
    # ("connectFullMesh failed ... Connection refused"): each attempt meets under its own prefix.
    if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT", "").isdigit():
        raise LmtoolError("WORLD_SIZE is set but MASTER_ADDR and MASTER_PORT are not: start lmtool with torchrun")
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    with _with_the_others(world):
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world.size,
            is_master=world.leader and not agent_store, timeout=timeout,
        )
        store = dist.PrefixStore(f"lmtool/attempt-{world.restart}", store)
        dist.init_process_group("gloo", store=store, rank=world.rank, world_size=world.size, timeout=timeout)
    # Taken down before the interpreter's own teardown: a gloo group left to it aborted a worker
    # at exit now and then ("terminate called without an active exception", SIGABRT), which
    # failed a finished job and left the other node's agent waiting at its exit barrier.
    atexit.register(dist.destroy_process_group)


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        with _with_the_others(world):
            dist.barrier()


def gather(world: World, value: Any) -> list[Any]:
    """Every rank's value, in rank order, on every rank."""
    if not world.distributed:
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * world.size
    with _with_the_others(world):
        dist.all_gather_object(values, value)
    return values


def on_leader(world: World, compute: Callable[[], Any]) -> Any:
    """compute() run by rank 0 alone, its result given to every rank. An LmtoolError it raises is
    raised on every rank, so a bad input list fails the whole job with rank 0's one-line message."""
    if not world.distributed:
        return compute()
    import torch.distributed as dist

    box: list[Any] = [None]
    if world.leader:
        try:
            box[0] = ("ok", compute())
        except LmtoolError as exc:
            box[0] = ("error", str(exc))
    with _with_the_others(world):
        dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise LmtoolError(value)
    return value


def rank_device(world: World, device: str) -> str:
    """Each rank on its own GPU: cuda (and auto, when CUDA is there) means cuda:LOCAL_RANK, taken
    modulo the GPUs visible. An explicit cuda:N is kept."""
    if not world.distributed or device not in ("cuda", "auto"):
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    return f"cuda:{world.local_rank % torch.cuda.device_count()}"


def rank_threads(world: World) -> int:
    """CPU threads for one rank: the cores shared among the ranks on this node (torchrun itself
    sets OMP_NUM_THREADS=1, right only when there are as many ranks as cores)."""
    return max(1, (os.cpu_count() or 1) // world.local_size)


def threads_for(world: World, threads: int | None) -> int | None:
    """--threads when given; for a rank of several on a node, its share of the cores."""
    return threads if threads is not None or not world.distributed else rank_threads(world)


def require_output(world: World, output: str | None) -> None:
    if world.distributed and output is None:
        raise LmtoolError(
            f"under torchrun ({world.size} ranks) give -o/--output FILE: the ranks write their records there, "
            "never to stdout"
        )


def read_on_leader(world: World, path: str, read: Callable[[str], Any]) -> Any:
    """read(path) on rank 0, its result (or its one-line error) given to every rank."""
    if not world.distributed:
        return read(path)
    start(world)
    stdin_check(world, path == "-")
    return on_leader(world, lambda: read(path))


def stdin_check(world: World, uses_stdin: bool) -> None:
    """Every worker inherits torchrun's stdin; rank 0 reads it and hands the inputs on, which only
    works when all ranks share rank 0's node (RANK is not tied to a node)."""
    if uses_stdin and not world.one_node:
        raise LmtoolError("stdin ('-') cannot feed a run over several nodes: give a file on a shared file system")


# --- the output file and its parts -----------------------------------------------------------------


def parts_dir(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".parts")


def _read_records(path: Path) -> list[dict]:
    return [record for _, record in read_lines(path)[0]]


def _part_records(output: Path) -> list[dict]:
    folder = parts_dir(output)
    if not folder.is_dir():
        return []
    return [r for part in sorted(folder.glob("*.jsonl")) for r in _read_records(part)]


def _write_atomically(path: Path, records: list[dict]) -> None:
    temporary = path.with_name(path.name + ".merge-tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            for record in records:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        raise LmtoolError(f"{path}: cannot write ({exc.strerror or exc})") from None


def fold_parts(output: str | Path) -> None:
    """Move the records of leftover part files into OUT (a crashed or restarted run's progress).
    OUT is replaced whole, and only then are the parts removed: a crash between the two leaves
    records twice, which merge_output tolerates."""
    output = Path(output)
    folder = parts_dir(output)
    if not folder.is_dir():
        return
    kept = _read_records(output) if output.exists() else []
    for record in _part_records(output):
        record.pop(POSITION, None)
        kept.append(record)
    _write_atomically(output, kept)
    shutil.rmtree(folder, ignore_errors=True)


def merge_output(output: str | Path, keys: list[str]) -> None:
    """Rewrite OUT as a single-process run writes it: one record per input, in input order. The
    records come from the part files (by their input position) and from OUT (by key, duplicate
    keys by occurrence); OUT's records of keys not among the inputs keep their place before the
    rest. Then the parts are removed."""
    output = Path(output)
    old = _read_records(output) if output.exists() else []
    new: dict[int, dict] = {}
    for record in _part_records(output):
        position = record.pop(POSITION, None)
        if isinstance(position, int) and 0 <= position < len(keys) and record_key(record) == keys[position]:
            new[position] = record
        else:
            old.append(record)
    by_key: dict[str, deque] = defaultdict(deque)
    for record in old:
        by_key[str(record_key(record))].append(record)
    inputs = set(keys)
    merged = [r for r in old if str(record_key(r)) not in inputs]
    for position, key in enumerate(keys):
        if position in new:
            merged.append(new[position])
        elif by_key[key]:
            merged.append(by_key[key].popleft())
    _write_atomically(output, merged)
    shutil.rmtree(parts_dir(output), ignore_errors=True)


class PartWriter:
    """A rank's part file: each record carries its input position."""

    def __init__(self, output: str | Path, world: World):
        folder = parts_dir(output)
        folder.mkdir(parents=True, exist_ok=True)
        # Named for whoever looks into a crashed run; rank 0 folded and removed the files of
        # earlier attempts before any rank starts writing.
        name = f"rank-{world.rank:05d}-attempt-{world.restart}.jsonl"
        self._writer = JsonlWriter(str(folder / name))

    def write(self, position: int, record: dict) -> None:
        self._writer.write({**record, POSITION: position})

    def close(self) -> None:
        self._writer.close()


# --- a sharded run ------------------------------------------------------------------------------


def _refuse_existing(output: Path, force: bool) -> None:
    if output.exists() and not force:
        raise LmtoolError(f"{output}: already exists (--resume continues it, --force replaces it)")


def check_output(world: World, output: str | None, *, resume: bool, force: bool) -> None:
    """Before the model loads: an existing OUT needs --resume or --force (rank 0 looks, so that
    no rank sees the OUT that rank 0 starts once the run is under way)."""
    if output is not None and not resume and world.restart == 0:
        on_leader(world, lambda: _refuse_existing(Path(output), force))


def sharded_run(
    world: World, output: str, keys: list[str], *, resume: bool, force: bool,
    work: Callable[[list[int], Callable[[int, dict], None]], Any],
) -> tuple[list[Any], int]:
    """Run work(positions, emit) on this rank's share of the inputs still to do and leave OUT as
    a single-process run writes it. Returns every rank's work() result (rank order) and how many
    inputs earlier runs had done. A torchrun restart resumes by itself: it is the same job."""
    resume = resume or world.restart > 0

    def plan() -> list[int]:
        path = Path(output)
        if resume:
            fold_parts(path)
            done = resume_keys(path)
        else:
            _refuse_existing(path, force)
            shutil.rmtree(parts_dir(path), ignore_errors=True)
            _write_atomically(path, [])
            done = set()
        return [position for position, key in enumerate(keys) if key not in done]

    todo = on_leader(world, plan)
    mine = todo[world.rank :: world.size]
    writer = PartWriter(output, world)
    try:
        result = work(mine, writer.write)
    finally:
        writer.close()
    results = gather(world, result)  # also the barrier: every part is complete
    if world.leader:
        merge_output(output, keys)
    barrier(world)
    return results, len(keys) - len(todo)
