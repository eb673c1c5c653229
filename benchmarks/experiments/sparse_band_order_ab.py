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

from sparse_common import (
    check_against_reference,
    check_variant_on_gpu,
    kernel_variant,
    time_on_synthetic,
)

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
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import gpu_check as g
    from sacli.kernels import triton_sparse as tsp

    uf = unmasked_first_module()
    base = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
    # gpu_check's float64 check, on the variant (MERGED_EDGES selects its new loops)
    rep = {"env": g.environment(sys.argv), "checks": check_variant_on_gpu(uf, [({**base, "MERGED_EDGES": True}, None)]), "runs": []}

    def launches(q, k, v, sel, counts, S):
        fns = [
            lambda: tsp.sparse_attention_triton(q, k, v, sel, 128**-0.5, config={**base, "MERGED_EDGES": False}, counts=counts),
            lambda: tsp.sparse_attention_triton(q, k, v, sel, 128**-0.5, config={**base, "MERGED_EDGES": True}, counts=counts),
            lambda: uf.sparse_attention_triton(q, k, v, sel, 128**-0.5, config={**base, "MERGED_EDGES": True}, counts=counts),
        ]
        w = int(sel.window[0, 0])
        return fns, {"window": w, "current": "merged" if tsp.merged_edges(w, S) else "split"}

    rep["runs"] = time_on_synthetic([(131072, (0.03, 0.05, 0.1)), (32768, (0.03, 0.05))],
                                    ("split", "merged", "unmasked_first"), launches)
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
