"""Where the time of a chunked selection (`chunk` knob) goes, against one list per head.

Run on a CUDA machine: `python benchmarks/experiments/chunk_profile.py OUT.json [S] [CHUNK]`.

For the default model's attention shape (9 x 3 heads, head_dim 64) and random inputs with 2%
attractive keys (as benchmarks/profile_pipeline.py), it times one `sample_attention` call
replayed as a CUDA graph with chunk = 0 and chunk = CHUNK, and profiles the eager pipeline of
each: device time per stage (stage 1 of every chunk, stage 2, the sparse kernel with its
counts) and the largest kernels.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

from sacli.bench import environment, time_ms
from sacli.kernels import backend as kb
from sacli.kernels import graphs, sample_attention
from sacli.kernels.api import _chunked_selection
from sacli.kernels.selection import fraction_to_tokens, sample_rows

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from profile_pipeline import kernel_times, structured_inputs  # noqa: E402

KW = dict(alpha=0.96, window=0.05, sample_ratio=0.02)


def main(path: str, S: int, chunk: int) -> None:
    Hq, Hkv, D = 9, 3, 64
    q, k, v = structured_inputs(Hq, Hkv, D, S)
    scale = D**-0.5
    w = fraction_to_tokens(KW["window"], S)
    report = {"env": environment(sys.argv), "settings": KW, "S": S, "chunk": chunk, "runs": {}}
    for c in (0, chunk):
        graphs.clear()
        replay = time_ms(lambda: sample_attention(q, k, v, scale=scale, dense_below=0, graphs=True, chunk=c, **KW))
        state = {}

        def stages():
            if c:
                state["sel"], state["counts"], state["density"] = _chunked_selection(
                    q, k, w, scale, KW["alpha"], KW["sample_ratio"], c, "triton")
            else:
                rows = sample_rows(S, KW["sample_ratio"], device=q.device)
                sc, wm = kb.column_scores(q, k, rows, w, scale, backend="triton")
                state["sel"], state["counts"], state["density"] = kb.selection_stage(sc, wm, KW["alpha"], w, S,
                                                                                     backend="triton")

        def sparse():
            kb.sparse_attention(q, k, v, state["sel"], scale, backend="triton", counts=state["counts"],
                                window_hint=w)

        by_kernel = defaultdict(float)
        per_stage = {}
        for name, fn in (("stages 1-2", stages), ("sparse", sparse)):
            times = kernel_times(fn)
            per_stage[name] = sum(t for _, t in times)
            for n, t in times:
                by_kernel[f"{name}: {n[:80]}"] += t
        report["runs"][f"chunk{c}"] = {
            "graph_replay_ms": replay,
            "density": float(state["density"].mean()),
            "kernel_ms_by_stage": per_stage,
            "top_kernels_ms": dict(sorted(by_kernel.items(), key=lambda kv: -kv[1])[:12]),
        }
        print(json.dumps(report["runs"][f"chunk{c}"], indent=1))
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 65536, int(sys.argv[3]) if len(sys.argv) > 3 else 2048)
