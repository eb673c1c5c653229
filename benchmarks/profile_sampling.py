"""Launch stage 1's two passes once each on the 8B-class shape, for a profiler to read.

`ncu --clock-control none -k regex:'_row_stats|_col_scores' python benchmarks/profile_sampling.py
[S] [CONFIG_JSON ...]` (S default 131072; each CONFIG_JSON a launch config as in
`triton_sampling.DEFAULT_CONFIG`, default `{}`). Each config's kernels are compiled and run once
before the profiled launches, in order: pass 1, pass 2 per config.
"""

from __future__ import annotations

import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from gpu_check import DEV, sampling_pass_fns  # noqa: E402

from sacli.kernels.selection import fraction_to_tokens, sample_rows  # noqa: E402


def main() -> None:
    S = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
    configs = [json.loads(a) for a in sys.argv[2:]] or [{}]
    g = torch.Generator(device=DEV).manual_seed(S)
    q = torch.randn(1, 32, S, 128, device=DEV, generator=g).to(torch.bfloat16)
    k = torch.randn(1, 8, S, 128, device=DEV, generator=g).to(torch.bfloat16)
    rows = sample_rows(S, 0.05).to(DEV)
    fns = [sampling_pass_fns(q, k, rows, fraction_to_tokens(0.05, S), 128**-0.5, c) for c in configs]
    torch.cuda.synchronize()
    for p1, p2 in fns:
        p1()
        p2()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
