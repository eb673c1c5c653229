"""Where the GPU time of one SampleAttention call goes, kernel by kernel.

Run on a CUDA machine: `python benchmarks/profile_pipeline.py OUT.json [S,...]`.

For the default model's attention shape (9 query heads, 3 KV heads, head_dim 64) at each length,
and for the 8B-class shape (32 x 8, head_dim 128) at the longest, it times one call of
`sample_attention` replayed as a CUDA graph (the product path), then profiles the same pipeline
launched eagerly with torch.profiler and sums the device time of its kernels by stage: sampling
(the two Triton passes and the merge of pass 1's splits), selection (stage 2 in PyTorch), the
sparse kernel with its per-block column counts, and the density statistics. Kernel times do not
depend on launch overheads, which the graph removes, so their sum is what a replay costs.

Inputs are random with 2% of the keys made attractive to every query (so the selection is sparse);
the sparse kernel's share reflects the density this yields (printed), not a real model's. The
sampling and selection kernels do not depend on the data.
"""

from __future__ import annotations

import json
import sys
import torch
from torch.profiler import ProfilerActivity, profile

from sacli.bench import environment, time_ms
from sacli.kernels import backend as kb
from sacli.kernels import graphs, sample_attention
from sacli.kernels.selection import fraction_to_tokens, sample_rows

DEV = torch.device("cuda")
KW = dict(alpha=0.95, window=0.05, sample_ratio=0.05)


def kernel_times(fn):
    """Device time of each kernel (and memset/copy) fn() launches, eagerly, after a warm-up:
    [(name, ms)]."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [(e.name, e.time_range.elapsed_us() / 1e3) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def structured_inputs(Hq, Hkv, D, S):
    """Random bf16 (q, k, v) of one sequence, seeded by S, where 2% of the keys share a direction
    with every query, so they draw most of the attention (logit ~8 above the rest) and the
    selection is sparse, as with a real model."""
    g = torch.Generator(device=DEV).manual_seed(S)
    q, k, v = (torch.randn(1, h, S, D, device=DEV, generator=g) for h in (Hq, Hkv, Hkv))
    u = torch.randn(D, device=DEV, generator=g)
    u = 8 * u / u.norm()
    hot = torch.randperm(S, device=DEV, generator=g)[: S // 50]
    q += u
    k[:, :, hot] += u
    return tuple(t.to(torch.bfloat16) for t in (q, k, v))


def profile_shape(Hq, Hkv, D, S):
    q, k, v = structured_inputs(Hq, Hkv, D, S)
    scale = D**-0.5
    graphs.clear()
    replay_ms = time_ms(lambda: sample_attention(q, k, v, scale=scale, dense_below=0, graphs=True, **KW))
    cudnn_ms = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=Hq != Hkv))
    w = fraction_to_tokens(KW["window"], S)
    state = {}

    def sampling():
        rows = sample_rows(S, KW["sample_ratio"], device=q.device)
        state["scores"], state["mass"] = kb.column_scores(q, k, rows, w, scale, backend="triton")

    def selection():
        state["sel"], state["counts"], state["density"] = kb.selection_stage(
            state["scores"], state["mass"], KW["alpha"], w, S, backend="triton")

    def sparse():
        kb.sparse_attention(q, k, v, state["sel"], scale, backend="triton", counts=state["counts"])

    per_stage, kernels = {}, []
    for name, fn in (("sampling", sampling), ("selection", selection), ("sparse", sparse)):
        times = kernel_times(fn)
        per_stage[name] = {"ms": sum(t for _, t in times), "kernels": len(times)}
        kernels += [{"stage": name, "name": n[:100], "ms": t} for n, t in times]
    return {
        "shape": {"Hq": Hq, "Hkv": Hkv, "D": D, "S": S},
        "density": float(state["density"].mean()),
        "graph_replay_ms": replay_ms,
        "sdpa_cudnn_ms": cudnn_ms,
        "kernel_ms_by_stage": per_stage,
        "kernel_ms_total": sum(v["ms"] for v in per_stage.values()),
        "kernels": sorted(kernels, key=lambda r: -r["ms"]),
    }


def main(path: str, lengths: list[int]) -> None:
    report = {"env": environment(sys.argv), "settings": KW, "runs": []}
    cases = [(9, 3, 64, S) for S in lengths] + [(32, 8, 128, max(lengths))]
    for case in cases:
        r = profile_shape(*case)
        report["runs"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "kernels"}), flush=True)
        for kern in r["kernels"][:14]:
            print(f"   {kern['stage']:9s} {kern['ms']:.4f} ms  {kern['name']}", flush=True)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    spec = sys.argv[2] if len(sys.argv) > 2 else "16384,32768"
    main(sys.argv[1], [int(x) for x in spec.split(",") if x.strip()])
