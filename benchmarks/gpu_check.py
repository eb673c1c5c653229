"""GPU correctness check and launch-config comparison of the Triton SampleAttention kernels.

Run on a CUDA machine (benchmarks/gpu_run.sh does):
`python benchmarks/gpu_check.py OUT.json [LENGTHS|none] [sparse|sampling]` (LENGTHS default
32768,131072; `none`: correctness only; `sparse` / `sampling`: time only that stage).

1. Correctness at moderate shapes (GQA, both head dims, odd lengths, batch 2) for every launch
   config: the sparse kernel against float64 masked attention, bounded by twice PyTorch's own
   bf16 error; stage 1 against the float64 definition, bounded by twice the float32 reference's.
2. Timing of each launch config on the 8B-class shape (32 query heads, 8 KV heads, hd 128)
   at the given lengths: sparse kernel at several densities with packed and with gathered
   column tiles (autotuned and fixed launches), the two stage-1 passes; variants that are compared head to head run in
   alternating rounds (`time_interleaved`) so that the machine's drift falls on all of them.
Exits non-zero if any correctness check fails.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import traceback

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from sacli.bench import environment, synthetic_selection, time_ms
from sacli.kernels import backend as kb
from sacli.kernels import graphs, reference, sample_attention
from sacli.kernels.selection import Selection, fraction_to_tokens, sample_rows, select_columns, selection_mask
from sacli.kernels import triton_sampling as ts
from sacli.kernels import triton_sparse as tsp
from sacli.kernels.triton_common import use_descriptors

DEV = torch.device("cuda")
SPARSE_CONFIGS = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in tsp._CONFIGS]
# launch configs timed besides the autotuner's candidates (with host-side descriptors)
EXTRA_SPARSE_CONFIGS = [
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
]
SAMPLING_CONFIGS = [
    {},
    {"pipe1": 1, "pipe2": 1},
    {"pipe1": 1, "pipe2": 1, "tma1": 1},
    {"tma1": 1},
    {"pipe1": 1, "keys_per_tile": 64, "pipe2": 1, "stages2": 2, "tma1": 1},
    {"pipe1": 1, "warps1": 8, "pipe2": 1, "tma1": 1},
    {"pipe2": 1, "rows_m2": 1},
    {"pipe2": 0, "rows_m2": 1, "warps2": 8},
]


def masked_attention(q, k, v, mask, scale, dtype, chunk=8):
    """Dense masked attention in `dtype`, a few heads at a time to bound memory."""
    G = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    for h0 in range(0, q.shape[1], chunk):
        hs = slice(h0, h0 + chunk)
        kh = k.repeat_interleave(G, dim=1)[:, hs].to(dtype)
        vh = v.repeat_interleave(G, dim=1)[:, hs].to(dtype)
        logits = torch.matmul(q[:, hs].to(dtype), kh.transpose(-1, -2)) * scale
        logits = logits.masked_fill(~mask[:, hs], float("-inf"))
        out[:, hs] = torch.matmul(torch.softmax(logits, dim=-1), vh)
    return out


def random_selection(B, H, S, seed):
    g = torch.Generator().manual_seed(seed)
    C = S // 8
    win = torch.randint(1, S // 4, (B, H), generator=g)
    win[0, 0] = S  # one dense head
    cols = torch.full((B, H, C), S, dtype=torch.int32)
    ncols = torch.zeros(B, H, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            n = int(torch.randint(0, C + 1, (1,), generator=g))
            cols[b, h, :n] = torch.randperm(S, generator=g)[:n].sort().values.to(torch.int32)
            ncols[b, h] = n
    return Selection(win.to(torch.int32).to(DEV), cols.to(DEV), ncols.to(DEV), S)


def segmented(sel: Selection, segment: int, seed: int) -> Selection:
    """A segmented selection with the windows of `sel` and, per segment, random columns."""
    B, H = sel.window.shape
    S = sel.seq_len
    N, C = -(-S // segment), S // 8
    g = torch.Generator().manual_seed(seed)
    cols = torch.full((B, H, N, C), S, dtype=torch.int32)
    ncols = torch.randint(0, C + 1, (B, H, N), generator=g, dtype=torch.int32)
    for i in range(B * H * N):
        n = int(ncols.view(-1)[i])
        cols.view(-1, C)[i, :n] = torch.randperm(S, generator=g)[:n].sort().values.to(torch.int32)
    return Selection(sel.window, cols.to(DEV), ncols.to(DEV), S, segment=segment)


def check_sparse(case, config, tma=None, packed=None, segment=0):
    B, Hq, Hkv, S, D, *rest = case
    dtype = rest[0] if rest else torch.bfloat16
    g = torch.Generator(device=DEV).manual_seed(S * D + Hq)
    q = torch.randn(B, Hq, S, D, device=DEV, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, device=DEV, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, device=DEV, generator=g).to(dtype)
    sel = random_selection(B, Hq, S, seed=S)
    if segment:
        sel = segmented(sel, segment, seed=S + 1)
    mask = selection_mask(sel)
    scale = D**-0.5
    out = torch.full_like(q, float("nan"))
    tsp.sparse_attention_triton(q, k, v, sel, scale, out=out, config=config, tma=tma, packed=packed)
    used = use_descriptors(tsp.USE_TMA if tma is None else tma, S, q, k, v, out)
    ref = masked_attention(q, k, v, mask, scale, torch.float64)
    torch_err = (masked_attention(q, k, v, mask, scale, dtype).double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    ok = bool(not torch.isnan(out).any()) and err <= 2 * torch_err + 1e-5
    return {"case": [*case[:5], str(dtype)], "config": config, "tma": tma, "packed": packed, "segment": segment,
            "tma_used": used, "err": err, "torch_err": torch_err, "ok": ok}


def check_sampling(case, config):
    B, Hq, Hkv, S, D, ratio, wfrac = case
    g = torch.Generator(device=DEV).manual_seed(S + D)
    q = (torch.randn(B, Hq, S, D, device=DEV, generator=g) * 2).to(torch.bfloat16)
    k = torch.randn(B, Hkv, S, D, device=DEV, generator=g).to(torch.bfloat16)
    rows = sample_rows(S, ratio).to(DEV)
    w = fraction_to_tokens(wfrac, S)
    scale = D**-0.5
    R = rows.numel()
    out = (torch.full((B, Hq, S), float("nan"), device=DEV), torch.full((B, Hq, R), float("nan"), device=DEV))
    scores, mass = ts.column_scores_triton(q, k, rows, w, scale, out=out, config=config)
    ref_s, ref_m = reference.column_scores(q, k, rows, w, scale)
    G = Hq // Hkv
    kk = k.double().repeat_interleave(G, dim=1)
    logits = torch.matmul(q.double()[:, :, rows], kk.transpose(-1, -2)) * scale
    j = torch.arange(S, device=DEV)
    p = torch.softmax(logits.masked_fill(j > rows[:, None], float("-inf")), dim=-1)
    before = j <= rows[:, None] - w
    ex_s, ex_m = (p * before).sum(2) / R, (p * ~before).sum(-1)
    res = {"case": case, "config": config, "ok": True}
    for name, got, ref, ex in (("scores", scores, ref_s, ex_s), ("mass", mass, ref_m, ex_m)):
        terr = (ref.double() - ex).abs().max().item()
        err = (got.double() - ex).abs().max().item()
        res[f"{name}_err"], res[f"{name}_torch_err"] = err, terr
        res["ok"] &= bool(not torch.isnan(got).any()) and err <= 2 * terr + 1e-6
    return res


def time_sampling_passes(q, k, rows, w, scale, cfg):
    """Milliseconds of pass 1 and pass 2 separately, launching the kernels directly."""
    p1, p2 = sampling_pass_fns(q, k, rows, w, scale, cfg)
    return time_ms(p1), time_ms(p2)


def sampling_pass_fns(q, k, rows, w, scale, cfg):
    """Callables launching pass 1 (one split) and pass 2 of stage 1 directly with config cfg."""
    return sampling_pass_launchers(q, k, rows, w, scale, cfg)[:2]


def sampling_pass_launchers(q, k, rows, w, scale, cfg, module=ts, tma=None):
    """(pass 1, pass 2, scores, band masses): the two passes of `module` (a variant of
    kernels/triton_sampling.py; default the committed one) launched directly with config cfg,
    and the buffers they write. tma None: pass 1's key tiles through a descriptor where the
    launcher would use one; True / False forces it (e.g. for fp8 inputs, which the launcher
    never reads through one)."""
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    c = {**ts.DEFAULT_CONFIG, **cfg}
    R = rows.numel()
    rows32 = rows.to(torch.int32)
    bias = torch.empty(B, Hq, R, device=DEV)
    mass = torch.empty(B, Hq, R, device=DEV)
    scores = torch.empty(B, Hq, S, device=DEV)
    qk_scale = scale * 1.4426950408889634
    n_chunk = triton.cdiv(R, c["rows_per_program"])
    upcast, prec = False, "tf32"
    sb = max(S - 1, 1).bit_length()

    keys = triton.cdiv(S, 128) * 128  # one split: the pass as the 8B shape runs it

    # as the launcher decides (tma1 -1: its default), so these timings match the product's runs
    if tma is None:
        tma = use_descriptors(ts.USE_TMA if c["tma1"] < 0 else c["tma1"], S, k)
    kd = TensorDescriptor.from_tensor(k, [1, 1, c["keys_per_tile"], D]) if tma else None

    def p1():
        module._row_stats[(B * Hq, n_chunk, 1)](
            q, k, kd, rows32, bias, mass, bias, qk_scale, S, R, w, Hq, Hq // Hkv, n_chunk, keys,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), sb,
            HEAD_DIM=D, BLOCK_R=c["rows_per_program"], BLOCK_N=c["keys_per_tile"], UPCAST=upcast, PREC=prec,
            PIPE=bool(c["pipe1"]), SPLIT=False, TMA=tma, num_warps=c["warps1"], num_stages=c["stages1"])

    bn = c["cols_per_program"]
    n_cblk = triton.cdiv(S, bn)
    j0 = torch.arange(n_cblk, device=DEV, dtype=torch.int32) * bn
    first = torch.searchsorted(rows32, torch.stack((j0 + w, j0 + bn - 1 + w), -1).reshape(-1).contiguous()).to(torch.int32)

    def p2():
        module._col_scores[(B * Hq, n_cblk)](
            q, k, rows32, bias, first, scores, qk_scale, 1.0 / R, S, R, w, Hq, Hq // Hkv,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), sb,
            HEAD_DIM=D, BLOCK_N=bn, BLOCK_R=c["rows_per_step"], UPCAST=upcast, PREC=prec,
            PIPE=bool(c["pipe2"]), ROWS_M=bool(c["rows_m2"]), num_warps=c["warps2"], num_stages=c["stages2"])

    return p1, p2, scores, mass


def time_interleaved(fns, budget_ms: float = 2000.0, max_rounds: int = 40) -> list[float]:
    """Median milliseconds of each fn, timed in alternating rounds (fn0, fn1, ... fn0, fn1, ...)
    so clock drift between variants cancels out; one warm-up call each first."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    t0 = torch.cuda.Event(enable_timing=True)
    t1 = torch.cuda.Event(enable_timing=True)
    t0.record()
    for fn in fns:
        fn()
    t1.record()
    torch.cuda.synchronize()
    rounds = int(min(max_rounds, max(5, budget_ms / max(t0.elapsed_time(t1), 1e-3))))
    events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in fns]
              for _ in range(rounds)]
    for row in events:
        for fn, (a, b) in zip(fns, row):
            a.record()
            fn()
            b.record()
    torch.cuda.synchronize()
    return [statistics.median(row[i][0].elapsed_time(row[i][1]) for row in events) for i in range(len(fns))]


def _time_pass_variants(kind, which, variants, q, k, rows, w, scale, report) -> None:
    """Time one stage-1 pass (which: 0 or 1) under each config of `variants` in alternating
    rounds; append one entry of kind `kind` to report."""
    S = q.shape[2]
    try:
        times = time_interleaved([sampling_pass_fns(q, k, rows, w, scale, c)[which] for c in variants])
        entry = {"kind": kind, "S": S, "variants": variants, "ms": times}
    except Exception:
        entry = {"kind": kind, "S": S, "error": traceback.format_exc()[-800:]}
    report["timing"].append(entry)
    print(entry, flush=True)


def time_sampling(q, k, rows, w, scale, report) -> None:
    """Stage 1 autotuned, each pass under its launch variants in alternating rounds, then each
    SAMPLING_CONFIGS entry pass by pass; all appended to report."""
    S = q.shape[2]
    try:
        ms = time_ms(lambda: ts.column_scores_triton(q, k, rows, w, scale))
        entry = {"kind": "sampling_autotuned", "S": S, "total_ms": ms,
                 "pass1": str(getattr(ts._row_stats_tuned, "best_config", None)),
                 "pass2": str(getattr(ts._col_scores_tuned, "best_config", None))}
    except Exception:
        entry = {"kind": "sampling_autotuned", "S": S, "error": traceback.format_exc()[-800:]}
    report["timing"].append(entry)
    print(entry, flush=True)
    # pass 2 with the sampled rows as the MMA's M dimension (rows_m2) or the columns
    _time_pass_variants("pass2_rows_m", 1, [{"pipe2": p, "rows_m2": r, "warps2": nw, "stages2": ns} for p, r, nw, ns in
                                            [(1, 0, 4, 3), (1, 0, 4, 2), (1, 1, 4, 3), (0, 1, 4, 3), (1, 1, 4, 2),
                                             (1, 1, 8, 3), (0, 1, 8, 3)]], q, k, rows, w, scale, report)
    # pass 1 with pointer loads vs the key tiles through a descriptor
    _time_pass_variants("pass1_tma", 0, [{"pipe1": p, "tma1": t} for p in (0, 1) for t in (0, 1)],
                        q, k, rows, w, scale, report)
    for cfg in SAMPLING_CONFIGS:
        try:
            t1, t2 = time_sampling_passes(q, k, rows, w, scale, cfg)
            entry = {"kind": "sampling", "S": S, "config": cfg, "pass1_ms": t1, "pass2_ms": t2, "total_ms": t1 + t2}
        except Exception:
            entry = {"kind": "sampling", "S": S, "config": cfg, "error": traceback.format_exc()[-800:]}
        report["timing"].append(entry)
        print(entry, flush=True)


def main(path: str, lengths: list[int], sparse_only: bool = False, sampling_only: bool = False) -> int:
    """Correctness for every config, then timings at `lengths` (none: correctness with the
    autotuned configs only, a quick re-check after a change; sparse_only: time only the sparse
    kernel, packed vs gathered column tiles, and skip stage 1's checks; sampling_only: skip the
    sparse kernel's timing)."""
    light = not lengths
    report: dict = {"env": environment(sys.argv), "sparse_checks": [], "sampling_checks": [], "timing": []}
    failures = 0

    def save() -> None:
        report["failures"] = failures
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1, default=str)

    # Odd shapes with the autotuned config; every config on the benchmark's own specialisation
    # (multiples of 16, 32/8 heads) so the timing below reuses those compilations.
    sparse_runs = [((1, 8, 2, 4099, 128), None), ((2, 9, 3, 2000, 64), None),
                   ((1, 4, 2, 1000, 128, torch.float16), None), ((1, 4, 2, 1000, 64, torch.float32), None)]
    # float32 with head_dim 128: its first compilation takes minutes (passed on 2026-11-24,
    # raw/v7_gpu_check_block64.json); GPU_CHECK_FP32_128=1 adds it
    if os.environ.get("GPU_CHECK_FP32_128") == "1":
        sparse_runs.append(((1, 4, 2, 1000, 128, torch.float32), None))
    sparse_runs = [(case, cfg, tma) for case, cfg in sparse_runs for tma in (False, True)]
    # each launch config through descriptors (their pointer-load path is the same code)
    sparse_runs += [((1, 32, 8, 4096, 128), cfg, True)
                    for cfg in [None] + ([] if light else SPARSE_CONFIGS + EXTRA_SPARSE_CONFIGS)]
    sparse_runs.append(((1, 8, 2, 4099, 128), None, True, False))  # descriptors, columns gathered
    # both band edges in one loop (the structure for windows under EDGE_MERGE_MAX_TILES tiles)
    merged = {"MERGED_EDGES": True}
    sparse_runs += [((1, 8, 2, 4099, 128), merged, False), ((1, 8, 2, 4099, 128), merged, True),
                    ((2, 9, 3, 2000, 64), merged, True), ((1, 32, 8, 4096, 128), merged, True)]
    # segmented selections (a column list per segment of query rows), both loop structures
    sparse_runs += [((1, 8, 2, 4099, 128), None, True, None, 256), ((2, 9, 3, 2000, 64), None, False, None, 128),
                    ((2, 9, 3, 2000, 64), None, True, None, 128), ((2, 9, 3, 2000, 64), merged, True, None, 384),
                    ((1, 4, 2, 1000, 128, torch.float16), None, True, None, 128)]
    for case, cfg, tma, *extra in sparse_runs:
        try:
            r = check_sparse(case, cfg, tma, *extra)
        except Exception:
            r = {"case": case, "config": cfg, "tma": tma, "ok": False, "error": traceback.format_exc()[-800:]}
        failures += not r["ok"]
        report["sparse_checks"].append(r)
        print("sparse", r, flush=True)
    # the 9-head cases run pass 1 split over the keys (few row chunks), the others whole
    sampling_runs = [((1, 8, 2, 4099, 128, 0.05, 0.05), None), ((2, 9, 3, 3000, 64, 0.1, 0.02), None),
                     ((1, 9, 3, 16384, 64, 0.05, 0.05), None)]
    sampling_runs += [((1, 32, 8, 8192, 128, 0.05, 0.05), cfg) for cfg in [None] + ([] if light else SAMPLING_CONFIGS)]
    for case, cfg in [] if sparse_only else sampling_runs:
        try:
            r = check_sampling(case, cfg)
        except Exception:
            r = {"case": case, "config": cfg, "ok": False, "error": traceback.format_exc()[-800:]}
        failures += not r["ok"]
        report["sampling_checks"].append(r)
        print("sampling", r, flush=True)
    # CUDA graph replay of the whole pipeline == the eager pipeline, on fresh inputs each call
    try:
        graphs.clear()
        g = torch.Generator(device=DEV).manual_seed(5)
        kw = dict(alpha=0.95, window=0.05, sample_ratio=0.05, dense_below=0, backend="triton")
        same = True
        for _ in range(4):
            q, k, v = (torch.randn(1, h, 8192, 64, device=DEV, generator=g).to(torch.bfloat16) for h in (9, 3, 3))
            a, sa = sample_attention(q, k, v, graphs=True, **kw)
            b, sb = sample_attention(q, k, v, graphs=False, **kw)
            same &= bool(torch.equal(a, b) and torch.equal(sa.selection.cols, sb.selection.cols))
        r = {"ok": same and graphs.status()[0]["graph"], "status": graphs.status()}
    except Exception:
        r = {"ok": False, "error": traceback.format_exc()[-800:]}
    failures += not r["ok"]
    report["graph_check"] = r
    print("graphs", r, flush=True)
    save()
    print(f"correctness failures so far: {failures}", flush=True)

    if os.environ.get("GPU_CHECK_SEGMENTS") == "1":
        # the cost of a column list per segment: the same per-head columns given to every segment
        # (equal kept entries), against the per-head selection packed and gathered
        for Hq, Hkv, D, S, dens in ((9, 3, 64, 32768, 0.1), (9, 3, 64, 32768, 0.2), (9, 3, 64, 65536, 0.1),
                                    (32, 8, 128, 131072, 0.1)):
            g = torch.Generator(device=DEV).manual_seed(S)
            q = torch.randn(1, Hq, S, D, device=DEV, generator=g).to(torch.bfloat16)
            k, v = (torch.randn(1, Hkv, S, D, device=DEV, generator=g).to(torch.bfloat16) for _ in range(2))
            sel = synthetic_selection(1, Hq, S, density=dens, device=DEV, seed=S)
            N = -(-S // 128)
            seg = Selection(sel.window, sel.cols[:, :, None].expand(-1, -1, N, -1).contiguous(),
                            sel.ncols[:, :, None].expand(-1, -1, N).contiguous(), S, segment=128)
            same = bool(torch.equal(seg.kept_entries(), sel.kept_entries()))
            fns = [lambda p=p: tsp.sparse_attention_triton(q, k, v, sel, D**-0.5, packed=p) for p in (True, False)]
            fns.append(lambda: tsp.sparse_attention_triton(q, k, v, seg, D**-0.5))
            equal = bool(torch.equal(fns[1](), fns[2]()))  # gathered per head == segmented, bit for bit
            times = time_interleaved(fns)
            entry = {"kind": "sparse_segmented", "S": S, "Hq": Hq, "D": D, "density": float(sel.density().mean()),
                     "kept_equal": same, "output_equal": equal, "packed_ms": times[0], "gathered_ms": times[1],
                     "segmented_ms": times[2]}
            failures += not (same and equal)
            report["timing"].append(entry)
            print(entry, flush=True)
            del q, k, v, seg
            torch.cuda.empty_cache()
        save()

    if sparse_only:
        # the default model's shape (9 x 64, 3 KV heads): the autotuned launch vs 64-row programs
        for S in (16384, 32768, 65536):
            g = torch.Generator(device=DEV).manual_seed(S)
            q = torch.randn(1, 9, S, 64, device=DEV, generator=g).to(torch.bfloat16)
            k, v = (torch.randn(1, 3, S, 64, device=DEV, generator=g).to(torch.bfloat16) for _ in range(2))
            for dens in (0.1, 0.2):
                sel = synthetic_selection(1, 9, S, density=dens, device=DEV, seed=S)
                counts = tsp.column_counts(sel, tsp.count_block())
                small = [(None, True), (None, False), (EXTRA_SPARSE_CONFIGS[0], True), (EXTRA_SPARSE_CONFIGS[0], False)]
                times = time_interleaved([lambda c=c, p=p: tsp.sparse_attention_triton(q, k, v, sel, 0.125, counts=counts,
                                                                                      config=c, packed=p)
                                          for c, p in small])
                entry = {"kind": "sparse_small", "S": S, "density": dens, "configs": small, "ms": times,
                         "autotuned": str(getattr(tsp._sparse_attn_fwd_tuned, "best_config", None))}
                report["timing"].append(entry)
                print(entry, flush=True)
        save()

    for S in () if sparse_only else (16384, 32768):
        # the default model's shape (9 x 64, 3 KV heads): pass 1 split vs whole, and stage 2
        g = torch.Generator(device=DEV).manual_seed(S)
        q = torch.randn(1, 9, S, 64, device=DEV, generator=g).to(torch.bfloat16)
        k = torch.randn(1, 3, S, 64, device=DEV, generator=g).to(torch.bfloat16)
        rows = sample_rows(S, 0.05, device=DEV)
        w = fraction_to_tokens(0.05, S)
        entry = {"kind": "sampling_small", "S": S}
        # pass 1 whole vs split in 4 (528 programs, 4 per SM), eager and as a replayed CUDA graph
        for name, cfg in (("split4", {"keys_per_split": -(-S // 4)}), ("whole", {"keys_per_split": S})):
            entry[f"{name}_ms"] = time_ms(lambda: ts.column_scores_triton(q, k, rows, w, 0.125, config=cfg))
            ts.column_scores_triton(q, k, rows, w, 0.125, config=cfg)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                ts.column_scores_triton(q, k, rows, w, 0.125, config=cfg)
            entry[f"{name}_graph_ms"] = time_ms(graph.replay)
        scores, mass = ts.column_scores_triton(q, k, rows, w, 0.125)
        entry["selection_torch_ms"] = time_ms(lambda: select_columns(scores, mass, 0.95, w, S))
        entry["selection_ms"] = time_ms(lambda: kb.selection_stage(scores, mass, 0.95, w, S))
        # stage 2 in Triton == the PyTorch reference (columns, counts, density) on real scores
        sel, counts, dens = kb.selection_stage(scores, mass, 0.95, w, S)
        ref = select_columns(scores, mass, 0.95, w, S)
        entry["selection_equal"] = bool(torch.equal(sel.cols, ref.cols) and torch.equal(sel.ncols, ref.ncols)
                                        and torch.equal(counts, tsp.column_counts(ref, tsp.count_block()))
                                        and torch.equal(dens, ref.density().float()))
        failures += not entry["selection_equal"]
        v = torch.randn(1, 3, S, 64, device=DEV, generator=g).to(torch.bfloat16)
        for name, flag in (("pipeline_eager_ms", False), ("pipeline_graph_ms", True)):
            entry[name] = time_ms(lambda: sample_attention(q, k, v, alpha=0.95, window=0.05, sample_ratio=0.05,
                                                           scale=0.125, dense_below=0, graphs=flag))
        report["timing"].append(entry)
        print(entry, flush=True)

    for S in lengths:
        g = torch.Generator(device=DEV).manual_seed(S)
        q = torch.randn(1, 32, S, 128, device=DEV, generator=g).to(torch.bfloat16)
        k = torch.randn(1, 8, S, 128, device=DEV, generator=g).to(torch.bfloat16)
        v = torch.randn(1, 8, S, 128, device=DEV, generator=g).to(torch.bfloat16)
        scale = 128**-0.5
        rows = sample_rows(S, 0.05).to(DEV)
        w = fraction_to_tokens(0.05, S)
        if not sparse_only:
            time_sampling(q, k, rows, w, scale, report)
        for dens in () if sampling_only else (0.03, 0.1, 0.4):
            sel = synthetic_selection(1, 32, S, density=dens, device=DEV, seed=S)
            kept = float(sel.kept_entries().sum())
            counts = tsp.column_counts(sel, tsp.count_block())
            # packed columns vs gathered columns, autotuned and fixed launches
            variants = [(None, True), (None, False), (SPARSE_CONFIGS[0], True), (SPARSE_CONFIGS[0], False)]
            fns = [lambda cfg=cfg, p=p: tsp.sparse_attention_triton(q, k, v, sel, scale, config=cfg, counts=counts,
                                                                   packed=p) for cfg, p in variants]
            ok = []
            for (cfg, packed), fn in zip(variants, fns):
                try:
                    fn()
                    ok.append(True)
                except Exception:
                    ok.append(False)
                    report["timing"].append({"kind": "sparse", "S": S, "config": cfg, "packed": packed,
                                             "error": traceback.format_exc()[-800:]})
            times = iter(time_interleaved([fn for fn, good in zip(fns, ok) if good]))
            for (cfg, packed), good in zip(variants, ok):
                if not good:
                    continue
                ms = next(times)
                entry = {"kind": "sparse", "S": S, "density": kept / (32 * S * (S + 1) / 2), "config": cfg,
                         "packed": packed, "ms": ms, "tflops": 4 * 128 * kept / ms / 1e9}
                report["timing"].append(entry)
                print(entry, flush=True)
            save()
        best = getattr(tsp._sparse_attn_fwd_tuned, "best_config", None)
        report.setdefault("autotuned", {})[S] = str(best)
        del q, k, v
        torch.cuda.empty_cache()
    save()
    print(f"correctness failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    spec = sys.argv[2] if len(sys.argv) > 2 else "32768,131072"
    part = sys.argv[3] if len(sys.argv) > 3 else ""
    if part not in ("", "sparse", "sampling"):
        sys.exit(f"gpu_check.py: third argument must be 'sparse' or 'sampling', got {part!r}")
    sys.exit(main(sys.argv[1], [int(x) for x in spec.split(",") if x.strip() and x != "none"],
                  sparse_only=part == "sparse", sampling_only=part == "sampling"))
