"""Runs `sacli ARGS...` with or without the collector paused in the timed prefill (A/B).

    python3 benchmarks/experiments/gc_ab.py on|off ARGS...

`off` makes `gc.disable()` a no-op, so models/generate.py's pause does nothing and the
collector may run inside TTFT, as before the pause existed.
"""

import gc
import runpy
import sys

if sys.argv[1] == "off":
    gc.disable = lambda: None
sys.argv = ["sacli", *sys.argv[2:]]
runpy.run_module("sacli", run_name="__main__")
