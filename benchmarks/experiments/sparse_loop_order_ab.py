"""Sparse kernel: the column loops' order, previous (whole tiles, then the partial tile) vs
current (partial tile first), timed in alternating rounds
(`raw/v8_gpu_sparse_loop_order.json`, packed columns; `..._gathered.json`, gathered columns).

`python3 benchmarks/experiments/sparse_loop_order_ab.py OUT.json 1` (packed: 128K and 32K at
3/10/40% density) or `... OUT.json 0` (gathered: 128K and 16K at 3/10%), on a GPU. The previous
order is rebuilt from kernels/triton_sparse.py by swapping the two loops back, so both variants
are otherwise the same code; `max_abs_diff` compares their outputs (bf16 rounding only).
"""

import importlib.util
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import gpu_check as g  # noqa: E402

from sacli.bench import synthetic_selection  # noqa: E402
from sacli.kernels import triton_sparse as tsp  # noqa: E402


def previous_order_module():
    """kernels/triton_sparse.py with the partial column tile's loop moved back after the whole tiles'."""
    src = open(tsp.__file__).read()
    partial = src.index("    for start in range(n_all_tiles, n_any, BLOCK_N):")
    whole = src.index("    for start in range(0, n_all_tiles, BLOCK_N):")
    band = src.index("    # (b) the band [lo, hi)")
    src = src[:partial] + src[whole:band].rstrip("\n") + "\n" + src[partial:whole] + "\n" + src[band:]
    src = src.replace("from .selection import", "from sacli.kernels.selection import")
    src = src.replace("from .triton_common import", "from sacli.kernels.triton_common import")
    path = os.path.join(tempfile.mkdtemp(), "triton_sparse_previous_order.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("triton_sparse_previous_order", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


out, packed = sys.argv[1], bool(int(sys.argv[2]))
old = previous_order_module()
rep = {"env": g.environment(sys.argv), "runs": []}
cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
for S in (131072, 32768) if packed else (131072, 16384):
    gen = torch.Generator(device="cuda").manual_seed(S)
    q = torch.randn(1, 32, S, 128, device="cuda", generator=gen).to(torch.bfloat16)
    k = torch.randn(1, 8, S, 128, device="cuda", generator=gen).to(torch.bfloat16)
    v = torch.randn(1, 8, S, 128, device="cuda", generator=gen).to(torch.bfloat16)
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
