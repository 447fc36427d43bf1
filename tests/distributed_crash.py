"""A torchrun entry for tests/test_distributed.py: lmtool, with one rank of the first attempt
dying (exit 1, no clean-up) right after writing its N-th record. CRASH_AFTER="RANK:N"."""

import os
import sys

from lmtool import distributed
from lmtool.cli import main

crash_rank, crash_after = map(int, os.environ["CRASH_AFTER"].split(":"))
if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and int(os.environ["RANK"]) == crash_rank:
    write = distributed.PartWriter.write
    written = [0]

    def write_then_die(self, position, record):
        write(self, position, record)
        written[0] += 1
        if written[0] == crash_after:
            os._exit(1)

    distributed.PartWriter.write = write_then_die

main(sys.argv[1:])
