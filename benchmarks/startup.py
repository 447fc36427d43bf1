"""Start-up time of the commands a shell runs most (help, --version, completion) against
`python -c "import torch"` on the same machine: median wall time of fresh processes, alternated.

    python benchmarks/startup.py [--repeat 11]

Prints each command's median, torch's median and the ratio; the target (issue 15) is a ratio of at
most 0.35 for every command. Exit status 1 when a command misses it.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET = 0.35


def lmtool_command() -> list[str]:
    """The console script beside this interpreter (what a user runs), else `python -m lmtool`."""
    script = Path(sys.executable).parent / "lmtool"
    if script.exists():
        return [str(script)]
    found = shutil.which("lmtool")
    return [found] if found else [sys.executable, "-m", "lmtool"]


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=11, help="fresh processes per command (default 11)")
    args = parser.parse_args()
    lmtool = lmtool_command()
    torch_name = 'python -c "import torch"'
    commands = {
        "lmtool --help": [*lmtool, "--help"],
        "lmtool generate --help": [*lmtool, "generate", "--help"],
        "lmtool --version": [*lmtool, "--version"],
        "completion request (cached Hub ids)": [*lmtool, "__complete", "models"],
        torch_name: [sys.executable, "-c", "import torch"],
    }
    for command in commands.values():  # warm the file cache once
        wall_time(command)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeat):
        for name, command in commands.items():  # alternated, so drift on a busy host hits all alike
            times[name].append(wall_time(command))
    medians = {name: statistics.median(values) for name, values in times.items()}
    torch_median = medians.pop(torch_name)
    width = max(map(len, medians))
    print(f"{torch_name:<{width}}  {torch_median * 1000:7.0f} ms  (median of {args.repeat})")
    worst = 0.0
    for name, median in medians.items():
        ratio = median / torch_median
        worst = max(worst, ratio)
        print(f"{name:<{width}}  {median * 1000:7.0f} ms  ratio {ratio:.2f}")
    print(f"worst ratio {worst:.2f}; target <= {TARGET}: {'met' if worst <= TARGET else 'MISSED'}")
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
