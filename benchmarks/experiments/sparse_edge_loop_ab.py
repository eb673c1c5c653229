"""Sparse kernel: the band's masked edge tiles in their own two loops (EDGE_LOOP 0, the
default) vs both edges in one loop before (1) or after (2) the unmasked band tiles, timed in
alternating rounds (`time_interleaved`) with fixed launches.

`python3 benchmarks/experiments/sparse_edge_loop_ab.py OUT.json`, on a GPU. Cases: the 8B-class
shape (32 x 128, 8 KV heads) at 128K and 32K with the synthetic bench's selections (half band,
half columns) at 3-40% density, packed columns, BLOCK 128 x 128 / 8 warps / 3 stages; the default
model's shape (9 x 64, 3 KV heads) at 16K and 32K with the product's window (5% of S) plus
columns to ~17% density, under both of its autotuning candidates, packed and gathered.
`max_abs_diff` compares each variant's output with EDGE_LOOP 0's (bf16 rounding only).
Needs the three-way kernel: `patch -p1 < benchmarks/experiments/v9_edge_loop_3way.patch` (the
committed kernel keeps EDGE_LOOP 0 and 2, as MERGED_EDGES False / True).
"""

import json
import sys

from sparse_common import bf16_qkv, compare

from sacli.bench import environment, synthetic_selection
from sacli.kernels import triton_sparse as tsp

out = sys.argv[1]
rep = {"env": environment(sys.argv), "runs": []}
BIG = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
SMALL = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def run(shape, S, sel, cfg, packed, label):
    Hq, Hkv, D = shape
    q, k, v = bf16_qkv(Hq, Hkv, S, D, seed=S + D)
    counts = tsp.column_counts(sel, tsp.count_block())
    fns = [lambda e=e: tsp.sparse_attention_triton(q, k, v, sel, D**-0.5, config={**cfg, "EDGE_LOOP": e},
                                                   counts=counts, packed=packed) for e in (0, 1, 2)]
    rep["runs"].append(compare(fns, ("edge0", "edge1", "edge2"), case=label, shape=shape, S=S, sel=sel, config=cfg,
                               packed=packed))


for S in (131072, 32768):
    for dens in (0.03, 0.05, 0.1, 0.2, 0.4) if S == 131072 else (0.03, 0.1):
        run((32, 8, 128), S, synthetic_selection(1, 32, S, density=dens, device="cuda", seed=S), BIG, True, "8b")
for S in (16384, 32768):
    w = int(0.05 * S)
    sel = synthetic_selection(1, 9, S, window=w, ncols=int(0.07 * S), device="cuda", seed=S)
    for cfg in (SMALL, BIG):
        for packed in (True, False):
            run((9, 3, 64), S, sel, cfg, packed, "default_model")
json.dump(rep, open(out, "w"), indent=1)
