"""Stage 1 pass 1 in Gluon vs Triton, 64- and 128-key tiles (`raw/v8_gpu_gluon_block64.json`).

Needs the experimental Gluon kernel: `git checkout 59ce885 && git apply
benchmarks/experiments/v8_stage1_variants.patch`, then on a Hopper GPU
`python3 benchmarks/experiments/gluon_pass1_tiles.py OUT.json`. Times the Triton pass 1 and
each Gluon variant (key tile, stages, Q in shared memory) in alternating rounds at 128K and 32K
(8B-class shape) and records the largest difference of their outputs.
"""

import json
import os
import sys

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import gpu_check as g  # noqa: E402

from sacli.kernels import gluon_sampling as gs  # noqa: E402
from sacli.kernels import triton_sampling as ts  # noqa: E402
from sacli.kernels.selection import fraction_to_tokens, sample_rows  # noqa: E402

out = sys.argv[1]
rep = {"env": g.environment(sys.argv), "runs": []}
for S in (131072, 32768):
    gen = torch.Generator(device="cuda").manual_seed(S)
    q = torch.randn(1, 32, S, 128, device="cuda", generator=gen).to(torch.bfloat16)
    k = torch.randn(1, 8, S, 128, device="cuda", generator=gen).to(torch.bfloat16)
    rows = sample_rows(S, 0.05).cuda()
    w = fraction_to_tokens(0.05, S)
    scale = 128**-0.5
    R = rows.numel()
    rows32 = rows.to(torch.int32)
    n_chunk = triton.cdiv(R, 64)
    keys = triton.cdiv(S, 128) * 128
    p1_ref, _ = g.sampling_pass_fns(q, k, rows, w, scale, {"pipe1": 1, "tma1": 1})
    bias_ref = torch.empty(1, 32, R, device="cuda")
    mass_ref = torch.empty_like(bias_ref)
    kd = TensorDescriptor.from_tensor(k, [1, 1, 128, 128])
    ts._row_stats[(32, n_chunk, 1)](
        q, k, kd, rows32, bias_ref, mass_ref, bias_ref, scale * 1.4426950408889634, S, R, w, 32, 4, n_chunk, keys,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), 17, HEAD_DIM=128, BLOCK_R=64,
        BLOCK_N=128, UPCAST=False, PREC="tf32", PIPE=True, SPLIT=False, TMA=True, num_warps=4, num_stages=3)
    variants = [(128, 3, 0), (64, 4, 1), (64, 3, 1), (64, 4, 0), (64, 3, 0), (64, 2, 0), (64, 6, 0)]
    fns, ok = [p1_ref], []
    for bn, st, qs in variants:
        bias = torch.empty_like(bias_ref)
        mass = torch.empty_like(bias_ref)
        gkd = gs.key_descriptor(k, bn)

        def fn(bias=bias, mass=mass, gkd=gkd, bn=bn, st=st, qs=qs):
            gs.row_stats_gluon[(32, n_chunk, 1)](
                q, gkd, rows32, bias, mass, bias, scale * 1.4426950408889634, S, R, w, 32, 4, n_chunk, keys,
                q.stride(0), q.stride(1), q.stride(2), HEAD_DIM=128, BLOCK_R=64, BLOCK_N=bn, STAGES=st,
                SPLIT=False, Q_SMEM=bool(qs), HEADS=1, num_warps=4)

        try:
            fn()
            torch.cuda.synchronize()
            ok.append({"bias_maxdiff": (bias - bias_ref).abs().max().item(),
                       "mass_maxdiff": (mass - mass_ref).abs().max().item()})
            fns.append(fn)
        except Exception as e:
            ok.append({"error": repr(e)[-300:]})
    times = iter(g.time_interleaved(fns))
    entry = {"S": S, "triton_ms": next(times), "variants": []}
    for (bn, st, qs), o in zip(variants, ok):
        entry["variants"].append({"block_n": bn, "stages": st, "q_smem": qs, **o,
                                  **({} if "error" in o else {"ms": next(times)})})
    rep["runs"].append(entry)
    print(json.dumps(entry), flush=True)
json.dump(rep, open(out, "w"), indent=1)
