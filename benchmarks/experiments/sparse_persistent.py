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

import json
import os
import sys

from sparse_common import bf16_qkv, check_against_reference, compare, kernel_variant

from sacli.bench import environment
from sacli.kernels import triton_sparse as tsp

PROGRAMS = int(os.environ.get("PERSISTENT_PROGRAMS", "132"))
# PERSISTENT_POINTER_STORE=1: O written with ordinary stores, which frees the TMA store buffer so
# that 3 stages fit (230 KB; 652 bytes of spills); then the committed kernel vs this form, 3 stages
POINTER_STORE = os.environ.get("PERSISTENT_POINTER_STORE") == "1"


def persistent_module():
    def edit(src: str) -> str:
        head = ("    bh = tl.program_id(0)\n"
                "    mblk = tl.num_programs(1) - 1 - tl.program_id(1)  # heaviest (last) query blocks first\n")
        a = src.index(head)
        b = src.index("\n\n# Few configs")
        body = src[a + len(head):b]
        loop = ("    n_mblk = tl.cdiv(S, BLOCK_M)\n"
                "    for tile in range(tl.program_id(0), n_mblk * S_BUCKET, tl.num_programs(0)):\n"
                "        mblk = n_mblk - 1 - tile // S_BUCKET\n"
                "        bh = tile % S_BUCKET\n")
        body = "\n".join(("    " + line) if line.strip() else line for line in body.split("\n"))
        src = src[:a] + loop + body + src[b:]
        old = """        _sparse_attn_fwd[(B * Hq, triton.cdiv(S, tiles["BLOCK_M"]))](
            *args, S_BUCKET=0,"""
        assert old in src
        src = src.replace(old, """        _sparse_attn_fwd[(min(PROGRAMS, B * Hq * triton.cdiv(S, tiles["BLOCK_M"])),)](
            *args, S_BUCKET=B * Hq,""")
        if POINTER_STORE:  # O through ordinary stores: no TMA store buffer
            src = src.replace("        if TMA:\n            OD.store(", "        if False:\n            OD.store(")
        return src.replace("USE_PACKED = True\n", f"USE_PACKED = True\nPROGRAMS = {PROGRAMS}\n")

    return kernel_variant("triton_sparse_persistent", edit)


def check_cpu() -> None:
    new = persistent_module()
    new.PROGRAMS = 3  # several tiles per program at these sizes
    check_against_reference(new)


def main(out: str) -> None:
    from sacli.bench import synthetic_selection

    new = persistent_module()
    rep = {"env": environment(sys.argv), "programs": PROGRAMS, "pointer_store": POINTER_STORE, "runs": []}
    big = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
    names = (("per_tile_3_stages", "persistent_3_stages_pointer_store") if POINTER_STORE
             else ("per_tile_3_stages", "per_tile_2_stages", "persistent_2_stages"))

    def run(shape, S, sel, label):
        Hq, Hkv, D = shape
        q, k, v = bf16_qkv(Hq, Hkv, S, D, seed=S + D)
        counts = tsp.column_counts(sel, tsp.count_block())
        cfg = {**big, "MERGED_EDGES": tsp.merged_edges(int(sel.window.max()), S)}
        two = {**cfg, "num_stages": 2}
        variants = ((tsp, cfg), (new, cfg)) if POINTER_STORE else ((tsp, cfg), (tsp, two), (new, two))
        fns = [lambda m=m, c=c: m.sparse_attention_triton(q, k, v, sel, D**-0.5, config=c, counts=counts)
               for m, c in variants]
        rep["runs"].append(compare(fns, names, case=label, shape=shape, S=S, sel=sel, config=cfg))

    for S in (131072, 32768):
        for dens in (0.03, 0.05, 0.1, 0.4) if S == 131072 else (0.03, 0.1):
            run((32, 8, 128), S, synthetic_selection(1, 32, S, density=dens, device="cuda", seed=S), "8b")
    for S in (16384, 32768):
        run((9, 3, 64), S, synthetic_selection(1, 9, S, window=int(0.05 * S), ncols=int(0.07 * S), device="cuda", seed=S),
            "default_model")
    json.dump(rep, open(out, "w"), indent=1)


if __name__ == "__main__":
    check_cpu() if sys.argv[1] == "--check" else main(sys.argv[1])
