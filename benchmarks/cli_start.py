"""Wall time of sacli commands in new processes, and whether each imports torch.

    python benchmarks/cli_start.py OUT.json [--runs 5] [--commit C] -- ARGS [-- ARGS ...]

Each ARGS (e.g. `models`, `--help`) runs as `python -m sacli ARGS` --runs times; one more run
under `python -X importtime` tells whether torch was imported.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    argv = sys.argv[1:]
    head, *commands = " ".join(argv).split(" -- ")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--commit", default="")
    a = parser.parse_args(head.split())
    results = {}
    for command in commands:
        args = command.split()
        walls = []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "sacli", *args], capture_output=True, check=True)
            walls.append(round(time.perf_counter() - t0, 3))
        trace = subprocess.run([sys.executable, "-X", "importtime", "-m", "sacli", *args], capture_output=True, text=True)
        torch_imported = any(re.search(r"\|\s+torch$", line.rstrip()) for line in trace.stderr.splitlines())
        results[command] = {"wall_s_runs": walls, "wall_s_median": statistics.median(walls), "imports_torch": torch_imported}
        print(command, results[command], file=sys.stderr)
    import torch

    payload = {
        "benchmark": "start-up time of sacli commands (wall, new process)",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{platform.machine()} CPU, torch {torch.__version__}",
        "commit": a.commit,
        "results": results,
    }
    a.out.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
