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

import importlib.util
import json
import os
import sys
import tempfile

import torch

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
    src = open(tsp.__file__).read()
    a = src.index("    for start in range(n_all_tiles, n_any, BLOCK_N):")
    b = src.index("    # Rows past S (last block only)")
    src = src[:a] + NEW_LOOPS + src[b:]
    src = src.replace("from .selection import", "from sacli.kernels.selection import")
    src = src.replace("from .triton_common import", "from sacli.kernels.triton_common import")
    path = os.path.join(tempfile.mkdtemp(), "triton_sparse_masked_first.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("triton_sparse_masked_first", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_cpu() -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
    import test_triton_kernels as t  # noqa: E402

    new = masked_first_module()
    for B, Hq, Hkv, S, D, dtype in t.SPARSE_CASES:
        q, k, v = t._qkv(B, Hq, Hkv, S, D, dtype, seed=S + D)
        sel = t._random_selection(B, Hq, S, seed=S)
        out = new.sparse_attention_triton(q, k, v, sel, D**-0.5, out=t._poisoned((B, Hq, S, D), dtype))
        t._assert_within_torch_error(out, q, k, v, t.selection_mask(sel), D**-0.5)
        print("ok", (B, Hq, Hkv, S, D, dtype))


def main(out: str) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import gpu_check as g  # noqa: E402

    from sacli.bench import synthetic_selection  # noqa: E402

    new = masked_first_module()
    rep = {"env": g.environment(sys.argv), "runs": []}
    big = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
    small = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}

    def run(shape, S, sel, cfg, label):
        Hq, Hkv, D = shape
        gen = torch.Generator(device="cuda").manual_seed(S + D)
        q = torch.randn(1, Hq, S, D, device="cuda", generator=gen).to(torch.bfloat16)
        k = torch.randn(1, Hkv, S, D, device="cuda", generator=gen).to(torch.bfloat16)
        v = torch.randn(1, Hkv, S, D, device="cuda", generator=gen).to(torch.bfloat16)
        kept = float(sel.kept_entries().sum())
        counts = tsp.column_counts(sel, tsp.count_block())
        fns = [lambda m=m: tsp.sparse_attention_triton(q, k, v, sel, D**-0.5, config={**cfg, "MERGED_EDGES": m},
                                                       counts=counts) for m in (False, True)]
        fns.append(lambda: new.sparse_attention_triton(q, k, v, sel, D**-0.5, config=cfg, counts=counts))
        ref = fns[0]().float()
        diffs = [(f().float() - ref).abs().max().item() for f in fns]
        ms = g.time_interleaved(fns)
        e = {"case": label, "shape": shape, "S": S, "density": kept / (Hq * S * (S + 1) / 2), "config": cfg,
             "ms": dict(zip(("separate_edges", "merged_edges", "masked_first"), ms)), "max_abs_diff": diffs,
             "tflops": [4 * D * kept / t / 1e9 for t in ms]}
        rep["runs"].append(e)
        print(json.dumps(e), flush=True)

    for S in (131072, 32768):
        for dens in (0.03, 0.05, 0.1, 0.2, 0.4) if S == 131072 else (0.03, 0.1):
            run((32, 8, 128), S, synthetic_selection(1, 32, S, density=dens, device="cuda", seed=S), big, "8b")
    for S in (16384, 32768):
        sel = synthetic_selection(1, 9, S, window=int(0.05 * S), ncols=int(0.07 * S), device="cuda", seed=S)
        for cfg in (small, big):
            run((9, 3, 64), S, sel, cfg, "default_model")
    json.dump(rep, open(out, "w"), indent=1)


if __name__ == "__main__":
    check_cpu() if sys.argv[1] == "--check" else main(sys.argv[1])
