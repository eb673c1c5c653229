"""TTFT with the prefill's per-layer timer synchronising CUDA around every decoder layer (the
timer before v9) vs recording CUDA events (the current one), both through `sacli bench ttft`.

`python3 benchmarks/experiments/layer_timer_ab.py sync|events LENGTHS OUT.json`, on a GPU with the
default model pulled. `events` runs the code as it is; `sync` swaps in a timer that synchronises
before and after each layer, as `sacli.models.generate._LayerTimer` did before. Both modes of
`bench ttft` (dense and sparse) use the swapped timer.
"""

import runpy
import sys
import time
from typing import Any, Callable

import torch

from sacli.models import generate as gen


class SyncPerLayerTimer(gen._LayerTimer):
    def _pre(self, i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            gen._sync(self.device)
            self._start[i] = time.perf_counter()

        return hook

    def _post(self, i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            gen._sync(self.device)
            self.ms[i] += (time.perf_counter() - self._start[i]) * 1e3
            self._report(i + 1)

        return hook

    def finish(self) -> None:
        pass


mode, lengths, out = sys.argv[1], sys.argv[2], sys.argv[3]
assert mode in ("sync", "events"), mode
if mode == "sync":
    gen._LayerTimer = SyncPerLayerTimer
sys.argv = ["sacli.bench", "ttft", "--text", ".dev/bench_data/moby_dick_2701.txt", "--lengths", lengths, "--out", out]
runpy.run_module("sacli.bench", run_name="__main__")
