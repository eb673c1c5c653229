"""Sparse kernel, 128-row programs with 128- vs 64-key tiles (`raw/v8_gpu_sparse_block_n64.json`).

`python3 benchmarks/experiments/sparse_block_n64.py OUT.json` on a GPU: 8B-class shape at 128K,
synthetic selections at 3%, 10% and 40% density, the configs timed in alternating rounds; each
output compared with the first config's.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import gpu_check as g  # noqa: E402

from sacli.bench import synthetic_selection  # noqa: E402
from sacli.kernels import triton_sparse as tsp  # noqa: E402

out = sys.argv[1]
rep = {"env": g.environment(sys.argv), "runs": []}
S = 131072
gen = torch.Generator(device="cuda").manual_seed(S)
q = torch.randn(1, 32, S, 128, device="cuda", generator=gen).to(torch.bfloat16)
k = torch.randn(1, 8, S, 128, device="cuda", generator=gen).to(torch.bfloat16)
v = torch.randn(1, 8, S, 128, device="cuda", generator=gen).to(torch.bfloat16)
cfgs = [{"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 4},
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}]
for dens in (0.03, 0.1, 0.4):
    sel = synthetic_selection(1, 32, S, density=dens, device="cuda", seed=S)
    kept = float(sel.kept_entries().sum())
    counts = tsp.column_counts(sel, tsp.count_block())
    ref = tsp.sparse_attention_triton(q, k, v, sel, 128**-0.5, config=cfgs[0], counts=counts).clone()
    fns, errs = [], []
    for c in cfgs:
        fn = lambda c=c: tsp.sparse_attention_triton(q, k, v, sel, 128**-0.5, config=c, counts=counts)  # noqa: E731
        try:
            o = fn()
            torch.cuda.synchronize()
            errs.append((o.float() - ref.float()).abs().max().item())
            fns.append(fn)
        except Exception as e:
            errs.append(repr(e)[-300:])
    times = iter(g.time_interleaved(fns))
    for c, e in zip(cfgs, errs):
        ms = next(times) if isinstance(e, float) else None
        entry = {"density": kept / (32 * S * (S + 1) / 2), "config": c, "max_diff_vs_first": e, "ms": ms,
                 "tflops": 4 * 128 * kept / ms / 1e9 if ms else None}
        rep["runs"].append(entry)
        print(json.dumps(entry), flush=True)
json.dump(rep, open(out, "w"), indent=1)
