"""Where the segments rule's stage 1 spends its time: `select_segments` on one layer of the
default model's shape (9 query heads, 3 KV heads, head_dim 64, bf16), random Q/K/V, at the
lengths given; wall time per call (median of 3 after a warm-up) and the torch profiler's top
operators by device time.

    python3 benchmarks/experiments/segments_profile.py OUT.json 16384,32768
"""

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import gpu_check as g
from sacli.kernels.rules import select_segments

out = sys.argv[1]
lengths = [int(x) for x in sys.argv[2].split(",")]
dev = "cuda" if torch.cuda.is_available() else "cpu"
rep = {"env": g.environment(sys.argv), "runs": []}
for S in lengths:
    gen = torch.Generator(device=dev).manual_seed(S)
    q, k, v = (torch.randn(1, h, S, 64, device=dev, generator=gen).to(torch.bfloat16) for h in (9, 3, 3))

    def call(q=q, k=k, v=v):
        return select_segments(q, k, v, alpha=0.98, window=0.05, sample_ratio=0.05, scale=0.125)

    call()
    walls = []
    for _ in range(3):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        call()
        if dev == "cuda":
            torch.cuda.synchronize()
        walls.append((time.perf_counter() - t) * 1e3)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        call()
        if dev == "cuda":
            torch.cuda.synchronize()
    key = "device_time_total" if dev == "cuda" else "cpu_time_total"
    ops = sorted(prof.key_averages(), key=lambda e: getattr(e, "self_" + key, 0), reverse=True)[:20]
    top = [{"op": e.key, "calls": e.count, "self_ms": getattr(e, "self_" + key, 0) / 1e3} for e in ops]
    entry = {"S": S, "wall_ms": walls, "wall_ms_median": statistics.median(walls), "top_ops": top,
             "device_ms_total": sum(getattr(e, "self_" + key, 0) for e in prof.key_averages()) / 1e3}
    rep["runs"].append(entry)
    print(json.dumps(entry), flush=True)
    del q, k, v
with open(out, "w") as f:
    json.dump(rep, f, indent=1)
