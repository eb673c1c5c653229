"""Stage 1 pass 2 (rows as the MMA's M dimension) around the kept config: columns per program,
rows per step, warps (`raw/v8_gpu_pass2_shapes.json`).

`python3 benchmarks/experiments/pass2_shapes.py OUT.json` on a GPU: 8B-class shape at 128K and
32K and the default model's shape (9 x 64, 3 KV heads) at 32K, variants in alternating rounds.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import gpu_check as g  # noqa: E402

from sacli.kernels.selection import fraction_to_tokens, sample_rows  # noqa: E402

out = sys.argv[1]
rep = {"env": g.environment(sys.argv), "runs": []}
variants = [{"pipe2": 1, "rows_m2": 1, "stages2": 2},
            {"pipe2": 1, "rows_m2": 1, "stages2": 2, "cols_per_program": 64},
            {"pipe2": 1, "rows_m2": 1, "stages2": 3, "cols_per_program": 64},
            {"pipe2": 0, "rows_m2": 1, "stages2": 2, "cols_per_program": 64},
            {"pipe2": 1, "rows_m2": 1, "stages2": 2, "rows_per_step": 32},
            {"pipe2": 1, "rows_m2": 1, "stages2": 2, "cols_per_program": 256, "warps2": 8},
            {"pipe2": 0, "rows_m2": 1, "stages2": 2, "cols_per_program": 256, "warps2": 8}]
for S, H, HK, D in ((131072, 32, 8, 128), (32768, 32, 8, 128), (32768, 9, 3, 64)):
    gen = torch.Generator(device="cuda").manual_seed(S)
    q = torch.randn(1, H, S, D, device="cuda", generator=gen).to(torch.bfloat16)
    k = torch.randn(1, HK, S, D, device="cuda", generator=gen).to(torch.bfloat16)
    rows = sample_rows(S, 0.05).cuda()
    w = fraction_to_tokens(0.05, S)
    fns, ok = [], []
    for c in variants:
        try:
            p1, p2 = g.sampling_pass_fns(q, k, rows, w, D**-0.5, c)
            p1()
            p2()
            torch.cuda.synchronize()
            fns.append(p2)
            ok.append(c)
        except Exception as e:
            rep["runs"].append({"S": S, "config": c, "error": repr(e)[-300:]})
    entry = {"S": S, "heads": H, "head_dim": D, "variants": ok, "ms": g.time_interleaved(fns)}
    rep["runs"].append(entry)
    print(json.dumps(entry), flush=True)
json.dump(rep, open(out, "w"), indent=1)
