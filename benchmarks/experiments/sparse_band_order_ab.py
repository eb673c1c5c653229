"""Sparse kernel: the band's loops. Three structures, timed in alternating rounds:

- "split" (MERGED_EDGES False): lower-edge masked tiles, unmasked tiles, diagonal masked tiles;
- "merged" (MERGED_EDGES True, the current choice below 16 band tiles): unmasked tiles, then both
  edges' masked tiles in one loop (one pipeline fewer; ptxas: 420 bytes of spills for head_dim 128);
- "unmasked_first": unmasked tiles, then the lower edge's and the diagonal's masked tiles in two
  loops (ptxas: 28 bytes of spills, as "split").

    python3 benchmarks/experiments/sparse_band_order_ab.py check       # CPU, TRITON_INTERPRET=1
    python3 benchmarks/experiments/sparse_band_order_ab.py OUT.json    # GPU: float64 check + A/B
"""

import json
import os
import sys

from sparse_common import bf16_qkv, check_against_reference, compare, kernel_variant

OLD = """        for u in range(0, t_a + n_tiles - t_b):
            t = tl.where(u < t_a, u, u - t_a + t_b)
            acc, l_i, m_i = _band_tile(acc, l_i, m_i, q, k_base, v_base, KD, VD, b, hk, lo + t * BLOCK_N, offs_n,
                                       offs_d, offs_m, w, S, s_ks, s_vs, qk_scale, True, UPCAST, PREC, TMA)
"""
NEW = """        for t in range(0, t_a):
            acc, l_i, m_i = _band_tile(acc, l_i, m_i, q, k_base, v_base, KD, VD, b, hk, lo + t * BLOCK_N, offs_n,
                                       offs_d, offs_m, w, S, s_ks, s_vs, qk_scale, True, UPCAST, PREC, TMA)
        for t in range(t_b, n_tiles):
            acc, l_i, m_i = _band_tile(acc, l_i, m_i, q, k_base, v_base, KD, VD, b, hk, lo + t * BLOCK_N, offs_n,
                                       offs_d, offs_m, w, S, s_ks, s_vs, qk_scale, True, UPCAST, PREC, TMA)
"""


def unmasked_first_module():
    """kernels/triton_sparse.py whose MERGED_EDGES branch runs the two edges as separate loops."""
    def edit(src: str) -> str:
        assert OLD in src, "the merged band loop changed; update this experiment"
        return src.replace(OLD, NEW)

    return kernel_variant("triton_sparse_unmasked_first", edit)


def gpu(out: str) -> None:
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import gpu_check as g
    from sacli.kernels import triton_sparse as tsp

    from sacli.bench import synthetic_selection

    uf = unmasked_first_module()
    rep = {"env": g.environment(sys.argv), "checks": [], "runs": []}
    saved = g.tsp
    g.tsp = uf  # gpu_check's float64 check, on the variant (MERGED_EDGES selects its new loops)
    for case in [(1, 4, 2, 1000, 128), (2, 8, 2, 4096, 64), (1, 8, 2, 8192, 128)]:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "MERGED_EDGES": True}
        rep["checks"].append(g.check_sparse(case, cfg))
        print(json.dumps(rep["checks"][-1]), flush=True)
    g.tsp = saved
    base = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
    for S, densities in ((131072, (0.03, 0.05, 0.1)), (32768, (0.03, 0.05))):
        q, k, v = bf16_qkv(32, 8, S, 128, seed=S)
        for dens in densities:
            sel = synthetic_selection(1, 32, S, density=dens, device="cuda", seed=S)
            counts = tsp.column_counts(sel, tsp.count_block())
            fns = [
                lambda: tsp.sparse_attention_triton(q, k, v, sel, 128**-0.5, config={**base, "MERGED_EDGES": False}, counts=counts),
                lambda: tsp.sparse_attention_triton(q, k, v, sel, 128**-0.5, config={**base, "MERGED_EDGES": True}, counts=counts),
                lambda: uf.sparse_attention_triton(q, k, v, sel, 128**-0.5, config={**base, "MERGED_EDGES": True}, counts=counts),
            ]
            rep["runs"].append(compare(fns, ("split", "merged", "unmasked_first"), case="8B", shape=(32, 8, 128), S=S,
                                       sel=sel, window=int(sel.window[0, 0]),
                                       current=("merged" if tsp.merged_edges(int(sel.window[0, 0]), S) else "split")))
        del q, k, v
        torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump(rep, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1] == "check":
        mod = unmasked_first_module()
        saved = mod.merged_edges
        mod.merged_edges = lambda window, S: True  # every CPU case through the variant's loops
        check_against_reference(mod)
    else:
        gpu(sys.argv[1])
