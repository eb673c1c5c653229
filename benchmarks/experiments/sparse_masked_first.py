"""Sparse kernel: every masked tile of a program (the partial column tile(s) and both band edges)
in one loop of gathered loads, before the unmasked loops (whole column tiles, band interior):
three loops, so two software pipelines fewer to fill than with one loop per kind.

`python3 benchmarks/experiments/sparse_masked_first.py OUT.json` on a GPU: interleaved against
the committed kernel's two structures (MERGED_EDGES False / True), fixed launches, the 8B shape
at 128K (3-40%) and 32K (3%, 10%) and the default model's shape at 16K and 32K.
`python3 benchmarks/experiments/sparse_masked_first.py --check` (CPU, TRITON_INTERPRET=1): the
variant against the float64 reference at small shapes.
The variant is built from kernels/triton_sparse.py by replacing its loops (`masked_first_module`).
"""

import json
import sys

from sparse_common import bf16_qkv, check_against_reference, compare, kernel_variant

from sacli.bench import environment
from sacli.kernels import triton_sparse as tsp

NEW_LOOPS = '''    lo = tl.maximum(m0 - w + 1, 0)
    hi = tl.minimum(m1, S)
    n_tiles = tl.cdiv(hi - lo, BLOCK_N)
    t_a = tl.minimum(tl.cdiv(tl.maximum(m1 - w - lo, 0), BLOCK_N), n_tiles)
    t_b = tl.maximum(tl.minimum((m0 + 1 - lo) // BLOCK_N, n_tiles), t_a)
    n_cpart = tl.cdiv(n_any - n_all_tiles, BLOCK_N)
    for u in range(0, n_cpart + t_a + n_tiles - t_b):
        is_col = u < n_cpart
        start = n_all_tiles + u * BLOCK_N
        e = u - n_cpart
        t = tl.where(e < t_a, e, e - t_a + t_b)
        j0 = lo + t * BLOCK_N
        cvalid = (start + offs_n) < n_any
        cidx = tl.load(c_base + start + offs_n, mask=cvalid & is_col, other=0)
        idx = tl.where(is_col, cidx, j0 + offs_n)
        valid = tl.where(is_col, cvalid, (j0 + offs_n) < S)
        k = tl.load(k_base + idx[:, None] * s_ks + offs_d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_base + idx[:, None] * s_vs + offs_d[None, :], mask=valid[:, None], other=0.0)
        below = idx[None, :] <= offs_m[:, None] - w
        band = (idx[None, :] > offs_m[:, None] - w) & (idx[None, :] <= offs_m[:, None])
        mask = valid[None, :] & tl.where(is_col, below, band)
        acc, l_i, m_i = _online_tile(acc, l_i, m_i, q, k, v, qk_scale, mask, True, UPCAST, PREC)
    for start in range(0, n_all_tiles, BLOCK_N):
        if PACKED:
            k = row_tile(k_base, KCD, b, h, start, offs_n, offs_d, S, s_ks, False, True)
            v = row_tile(v_base, VCD, b, h, start, offs_n, offs_d, S, s_vs, False, True)
        else:
            idx = tl.load(c_base + start + offs_n)
            k = tl.load(k_base + idx[:, None] * s_ks + offs_d[None, :])
            v = tl.load(v_base + idx[:, None] * s_vs + offs_d[None, :])
        acc, l_i, m_i = _online_tile(acc, l_i, m_i, q, k, v, qk_scale, None, False, UPCAST, PREC)
    for t in range(t_a, t_b):
        j0 = lo + t * BLOCK_N
        k = row_tile(k_base, KD, b, hk, j0, offs_n, offs_d, S, s_ks, False, TMA)
        v = row_tile(v_base, VD, b, hk, j0, offs_n, offs_d, S, s_vs, False, TMA)
        acc, l_i, m_i = _online_tile(acc, l_i, m_i, q, k, v, qk_scale, None, False, UPCAST, PREC)

'''


def masked_first_module():
    def edit(src: str) -> str:
        a = src.index("    for start in range(n_all_tiles, n_any, BLOCK_N):")
        b = src.index("    # Rows past S (last block only)")
        return src[:a] + NEW_LOOPS + src[b:]

    return kernel_variant("triton_sparse_masked_first", edit)


def main(out: str) -> None:
    from sacli.bench import synthetic_selection

    new = masked_first_module()
    rep = {"env": environment(sys.argv), "runs": []}
    big = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
    small = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}

    def run(shape, S, sel, cfg, label):
        Hq, Hkv, D = shape
        q, k, v = bf16_qkv(Hq, Hkv, S, D, seed=S + D)
        counts = tsp.column_counts(sel, tsp.count_block())
        fns = [lambda m=m: tsp.sparse_attention_triton(q, k, v, sel, D**-0.5, config={**cfg, "MERGED_EDGES": m},
                                                       counts=counts) for m in (False, True)]
        fns.append(lambda: new.sparse_attention_triton(q, k, v, sel, D**-0.5, config=cfg, counts=counts))
        rep["runs"].append(compare(fns, ("separate_edges", "merged_edges", "masked_first"), case=label, shape=shape,
                                   S=S, sel=sel, config=cfg))

    for S in (131072, 32768):
        for dens in (0.03, 0.05, 0.1, 0.2, 0.4) if S == 131072 else (0.03, 0.1):
            run((32, 8, 128), S, synthetic_selection(1, 32, S, density=dens, device="cuda", seed=S), big, "8b")
    for S in (16384, 32768):
        sel = synthetic_selection(1, 9, S, window=int(0.05 * S), ncols=int(0.07 * S), device="cuda", seed=S)
        for cfg in (small, big):
            run((9, 3, 64), S, sel, cfg, "default_model")
    json.dump(rep, open(out, "w"), indent=1)


if __name__ == "__main__":
    check_against_reference(masked_first_module()) if sys.argv[1] == "--check" else main(sys.argv[1])
