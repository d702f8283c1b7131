"""Run a queue of frontier.py stages on a shared machine, keeping a fixed number of copies busy.

Each non-empty line of the queue file (a line starting with ``#`` is a comment) is one stage: the arguments of
one ``benchmarks/frontier.py`` command. Whenever fewer than ``--slots`` frontier.py processes
run on this machine (counted with ``pgrep``, so copies started by hand count too), the next
copy of the current stage starts; a stage gets at most ``--copies`` copies (frontier.py copies
of one command share its cells through lock files), then the queue moves on. A slow last cell
(Torch-Pruning runs ~5x a uniform cell) then no longer idles the other slot, as
``copy & copy & wait`` does. A copy that fails within its first seconds (a mistyped flag, a
method its line does not define) stops the queue with exit status 1, its error at the end of
``--log``. Stopping this script leaves the started copies running; starting it again skips
finished cells (frontier.py resumes them).

::

    PYTHONPATH=/work/frontier_code python benchmarks/frontier_queue.py queue.txt \\
        --common "--epochs 15 --threads 1 --data-dir ../shared/data"
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def read_queue(path: Path) -> list[list[str]]:
    """The stages of a queue file: one argument list per non-empty, non-comment line."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [shlex.split(line) for line in lines if line and not line.startswith("#")]


def running_copies() -> int:
    """frontier.py processes running on this machine."""
    out = subprocess.run(["pgrep", "-fc", "benchmarks/frontier.py"], capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("queue", type=Path, help="file: one frontier.py argument list per line")
    p.add_argument("--slots", type=int, default=2, help="frontier.py processes to keep running")
    p.add_argument("--copies", type=int, default=2, help="copies per stage at most")
    p.add_argument("--common", default="", help="arguments added to every stage")
    p.add_argument("--log", type=Path, default=HERE / "results" / "frontier_cpu" / "runs.log")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between checks")
    p.add_argument("--dry-run", action="store_true", help="print the commands, start nothing")
    args = p.parse_args(argv)
    if not args.queue.is_file():
        p.error(f"queue file {args.queue} not found")
    stages = read_queue(args.queue)
    common = shlex.split(args.common)
    for i, stage in enumerate(stages):
        cmd = [sys.executable, str(HERE / "frontier.py"), *stage, *common]
        for k in range(args.copies):
            if args.dry_run:
                print(f"stage {i} copy {k + 1}: {shlex.join(cmd)}")
                continue
            while running_copies() >= args.slots:
                time.sleep(args.poll)
            with args.log.open("a") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # fmt: skip
            print(f"{time.strftime('%H:%M:%S')} stage {i} copy {k + 1}: {shlex.join(stage)}",
                  flush=True)  # fmt: skip
            # let it claim a cell before the next one looks; a copy that fails at once (a
            # mistyped flag, a method its line does not define) stops the queue instead of
            # looking like a finished stage
            rc = _wait_at_most(proc, min(args.poll, 20.0))
            if rc not in (None, 0):
                print(f"stage {i} copy {k + 1} failed at once (exit status {rc}): its error is "
                      f"at the end of {args.log}; fix the line and start the queue again "
                      "(finished cells are skipped)", file=sys.stderr, flush=True)  # fmt: skip
                return 1
    return 0


def _wait_at_most(proc: subprocess.Popen, seconds: float) -> int | None:
    """``proc``'s exit status if it ends within ``seconds``, else None (it runs on)."""
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
