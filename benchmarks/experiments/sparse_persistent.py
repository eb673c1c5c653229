"""Sparse kernel as a persistent kernel: one program per SM walks the (query block, head) tiles,
heaviest first (tile t -> query block n - 1 - t // (B * Hq), head t % (B * Hq)), round robin over
the programs, instead of one program per tile. What it could save is the per-tile launch and
teardown of a program (one resident per SM with 128 x 128 tiles and 3 stages).

Compiled for sm_90 (Triton's ptxas, no GPU), the persistent form needs 263 KB of shared memory
with 3 stages (more than the 227 KB a program may have) and spills 612 bytes; with 2 stages 198
KB and 324 bytes. `python3 benchmarks/experiments/sparse_persistent.py OUT.json` on a GPU:
interleaved, fixed launches (128 x 128, 8 warps; the band structure the host rule picks): the
committed kernel with 3 stages (its launch) and 2 stages, and the persistent form with 2 stages;
8B shape at 128K and 32K, default model's shape at 16K and 32K.
`python3 benchmarks/experiments/sparse_persistent.py --check` (CPU, TRITON_INTERPRET=1): the
variant against the reference at small shapes. The variant is built from
kernels/triton_sparse.py's source (`persistent_module`); only the fixed-launch path is rewired.
"""

import importlib.util
import json
import os
import sys
import tempfile

import torch

from sacli.kernels import triton_sparse as tsp

PROGRAMS = int(os.environ.get("PERSISTENT_PROGRAMS", "132"))
# PERSISTENT_POINTER_STORE=1: O written with ordinary stores, which frees the TMA store buffer so
# that 3 stages fit (230 KB; 652 bytes of spills); then the committed kernel vs this form, 3 stages
POINTER_STORE = os.environ.get("PERSISTENT_POINTER_STORE") == "1"


def persistent_module():
    src = open(tsp.__file__).read()
    head = "    bh = tl.program_id(0)\n    mblk = tl.num_programs(1) - 1 - tl.program_id(1)  # heaviest (last) query blocks first\n"
    a = src.index(head)
    b = src.index("\n\n# Few configs")
    body = src[a + len(head):b]
    loop = ("    n_mblk = tl.cdiv(S, BLOCK_M)\n"
            "    for tile in range(tl.program_id(0), n_mblk * S_BUCKET, tl.num_programs(0)):\n"
            "        mblk = n_mblk - 1 - tile // S_BUCKET\n"
            "        bh = tile % S_BUCKET\n")
    body = "\n".join(("    " + line) if line.strip() else line for line in body.split("\n"))
    src = src[:a] + loop + body + src[b:]
    old = '''        _sparse_attn_fwd[(B * Hq, triton.cdiv(S, tiles["BLOCK_M"]))](
            *args, S_BUCKET=0,'''
    assert old in src
    src = src.replace(old, '''        _sparse_attn_fwd[(min(PROGRAMS, B * Hq * triton.cdiv(S, tiles["BLOCK_M"])),)](
            *args, S_BUCKET=B * Hq,''')
    if POINTER_STORE:  # O through ordinary stores: no TMA store buffer
        src = src.replace("        if TMA:\n            OD.store(", "        if False:\n            OD.store(")
    src = src.replace("from .selection import", "from sacli.kernels.selection import")
    src = src.replace("from .triton_common import", "from sacli.kernels.triton_common import")
    src = src.replace("USE_PACKED = True\n", f"USE_PACKED = True\nPROGRAMS = {PROGRAMS}\n")
    path = os.path.join(tempfile.mkdtemp(), "triton_sparse_persistent.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("triton_sparse_persistent", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_cpu() -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
    import test_triton_kernels as t  # noqa: E402

    new = persistent_module()
    new.PROGRAMS = 3  # several tiles per program at these sizes
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

    new = persistent_module()
    rep = {"env": g.environment(sys.argv), "programs": PROGRAMS, "pointer_store": POINTER_STORE, "runs": []}
    big = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}

    def run(shape, S, sel, label):
        Hq, Hkv, D = shape
        gen = torch.Generator(device="cuda").manual_seed(S + D)
        q = torch.randn(1, Hq, S, D, device="cuda", generator=gen).to(torch.bfloat16)
        k = torch.randn(1, Hkv, S, D, device="cuda", generator=gen).to(torch.bfloat16)
        v = torch.randn(1, Hkv, S, D, device="cuda", generator=gen).to(torch.bfloat16)
        kept = float(sel.kept_entries().sum())
        counts = tsp.column_counts(sel, tsp.count_block())
        cfg = {**big, "MERGED_EDGES": tsp.merged_edges(int(sel.window.max()), S)}
        two = {**cfg, "num_stages": 2}
        variants = ((tsp, cfg), (new, cfg)) if POINTER_STORE else ((tsp, cfg), (tsp, two), (new, two))
        fns = [lambda m=m, c=c: m.sparse_attention_triton(q, k, v, sel, D**-0.5, config=c, counts=counts)
               for m, c in variants]
        ref = fns[0]().float()
        diffs = [(f().float() - ref).abs().max().item() for f in fns]
        ms = g.time_interleaved(fns)
        e = {"case": label, "shape": shape, "S": S, "density": kept / (Hq * S * (S + 1) / 2), "config": cfg,
             "ms": dict(zip(("per_tile_3_stages", "persistent_3_stages_pointer_store") if POINTER_STORE
                                else ("per_tile_3_stages", "per_tile_2_stages", "persistent_2_stages"), ms)), "max_abs_diff": diffs,
             "tflops": [4 * D * kept / t / 1e9 for t in ms]}
        rep["runs"].append(e)
        print(json.dumps(e), flush=True)

    for S in (131072, 32768):
        for dens in (0.03, 0.05, 0.1, 0.4) if S == 131072 else (0.03, 0.1):
            run((32, 8, 128), S, synthetic_selection(1, 32, S, density=dens, device="cuda", seed=S), "8b")
    for S in (16384, 32768):
        run((9, 3, 64), S, synthetic_selection(1, 9, S, window=int(0.05 * S), ncols=int(0.07 * S), device="cuda", seed=S),
            "default_model")
    json.dump(rep, open(out, "w"), indent=1)


if __name__ == "__main__":
    check_cpu() if sys.argv[1] == "--check" else main(sys.argv[1])
