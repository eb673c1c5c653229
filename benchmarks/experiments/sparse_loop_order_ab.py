"""Sparse kernel: the column loops' order, previous (whole tiles, then the partial tile) vs
current (partial tile first), timed in alternating rounds
(`raw/v8_gpu_sparse_loop_order.json`, packed columns; `..._gathered.json`, gathered columns).

`python3 benchmarks/experiments/sparse_loop_order_ab.py OUT.json 1` (packed: 128K and 32K at
3/10/40% density) or `... OUT.json 0` (gathered: 128K and 16K at 3/10%), on a GPU. The previous
order is rebuilt from kernels/triton_sparse.py by swapping the two loops back, so both variants
are otherwise the same code; `max_abs_diff` compares their outputs (bf16 rounding only).
"""

import json
import os
import sys

import torch
from sparse_common import bf16_qkv, kernel_variant

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import gpu_check as g  # noqa: E402

from sacli.bench import synthetic_selection  # noqa: E402
from sacli.kernels import triton_sparse as tsp  # noqa: E402


def previous_order_module():
    """kernels/triton_sparse.py with the partial column tile's loop moved back after the whole tiles'."""
    def edit(src: str) -> str:
        partial = src.index("    for start in range(n_all_tiles, n_any, BLOCK_N):")
        whole = src.index("    for start in range(0, n_all_tiles, BLOCK_N):")
        band = src.index("    # (b) the band [lo, hi)")
        return src[:partial] + src[whole:band].rstrip("\n") + "\n" + src[partial:whole] + "\n" + src[band:]

    return kernel_variant("triton_sparse_previous_order", edit)


out, packed = sys.argv[1], bool(int(sys.argv[2]))
old = previous_order_module()
rep = {"env": g.environment(sys.argv), "runs": []}
cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
for S in (131072, 32768) if packed else (131072, 16384):
    q, k, v = bf16_qkv(32, 8, S, 128, seed=S)
    for dens in (0.03, 0.1, 0.4) if packed else (0.03, 0.1):
        sel = synthetic_selection(1, 32, S, density=dens, device="cuda", seed=S)
        kept = float(sel.kept_entries().sum())
        counts = tsp.column_counts(sel, tsp.count_block())
        fa = lambda: old.sparse_attention_triton(q, k, v, sel, 128**-0.5, config=cfg, counts=counts,  # noqa: E731
                                                 packed=packed)
        fb = lambda: tsp.sparse_attention_triton(q, k, v, sel, 128**-0.5, config=cfg, counts=counts,  # noqa: E731
                                                 packed=packed)
        diff = (fa().float() - fb().float()).abs().max().item()
        ta, tb = g.time_interleaved([fa, fb])
        e = {"S": S, "density": kept / (32 * S * (S + 1) / 2), "original_ms": ta, "reordered_ms": tb,
             "max_abs_diff": diff, "original_tflops": 4 * 128 * kept / ta / 1e9,
             "reordered_tflops": 4 * 128 * kept / tb / 1e9}
        rep["runs"].append(e)
        print(json.dumps(e), flush=True)
    del q, k, v
    torch.cuda.empty_cache()
json.dump(rep, open(out, "w"), indent=1)
