"""Columns per chunk of query rows against one column set per head, for the default `sample` rule.

The default rule gives every head one set of key columns, scored by the attention of 2% of the
rows (64-row blocks spread over the sequence). The later SampleAttention version samples per
chunk of queries instead. This script measures, on the real model's captured prefill and in
one pass over each head's dense attention (sacli.evaluate.measure_fidelity), the density and
output error of:

- `global`: the default rule as sacli runs it (sample_rows + column_scores + select_columns);
- `chunk C`: the same window, but each chunk of C query rows gets its own columns, scored by
  the rows sampled inside that chunk (sample_ratio x C rows on an even stride ending at the
  chunk's last row), optionally averaged with the neighbouring chunks' scores (`halo`).

    python benchmarks/experiments/chunked_columns.py --text .dev/bench_data/moby_dick_2701.txt \\
        --length 8192 --alphas 0.95,0.96,0.97,0.98 --chunks 2048,1024,512 --device cpu \\
        --out benchmarks/experiments/raw/chunked_columns_8k_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sacli import evaluate as ev
from sacli.config import load_settings
from sacli.kernels import Selection, column_scores, fraction_to_tokens, sample_rows, select_columns
from sacli.kernels.rules import DEFAULT_SEGMENTS, _smooth_segments, segment_windows


def chunk_rows(S: int, chunk: int, sample_ratio: float) -> list[torch.Tensor]:
    """Per chunk of `chunk` rows: ceil(sample_ratio x rows) rows on an even stride ending at the
    chunk's last row."""
    out = []
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        n = max(1, math.ceil(sample_ratio * (s1 - s0)))
        stride = (s1 - s0) / n
        r = torch.tensor(sorted({s1 - 1 - int(i * stride) for i in range(n)}), dtype=torch.int64)
        out.append(r)
    return out


def select_chunked(q, k, scale: float, *, alpha: float, window: float, sample_ratio: float, chunk: int,
                   halo: float) -> Selection:
    B, H, S, _ = q.shape
    w = fraction_to_tokens(window, S)
    per = chunk_rows(S, chunk, sample_ratio)
    scores, masses = [], []
    for r in per:
        sc, wm = column_scores(q, k, r.to(q.device), w, scale)
        scores.append(sc)
        masses.append(wm.mean(-1, keepdim=True))
    sc = torch.stack(scores, 2)  # (B, H, N, S)
    wm = torch.stack(masses, 2)  # (B, H, N, 1)
    N = sc.shape[2]
    if halo > 0 and N > 1:
        sc = _smooth_segments(sc.reshape(B * H, N, S), halo).view(B, H, N, S)
        # a chunk's columns must be visible to its own rows outside the band
        j = torch.arange(S, device=sc.device)
        last = torch.tensor([min(S, (c + 1) * chunk) - 1 for c in range(N)], device=sc.device)
        sc = sc * (j[None, :] <= (last - w)[:, None]).to(sc.dtype)
    sel = select_columns(sc.reshape(B, H * N, S), wm.reshape(B, H * N, 1), alpha, w, S, trim=True)
    C = sel.cols.shape[-1]
    return Selection(window=sel.window.view(B, H, N)[:, :, 0].contiguous(), cols=sel.cols.view(B, H, N, C),
                     ncols=sel.ncols.view(B, H, N), seq_len=S, segment=chunk)


def select_global(q, k, scale: float, *, alpha: float, window: float, sample_ratio: float,
                  window_tokens: int | None = None) -> Selection:
    S = q.shape[2]
    w = window_tokens or fraction_to_tokens(window, S)
    rows = sample_rows(S, sample_ratio, device=q.device)
    sc, wm = column_scores(q, k, rows, w, scale)
    return select_columns(sc, wm, alpha, w, S, trim=True)


def pick_per_head(sels: list[Selection]) -> Selection:
    """Per head, the selection of `sels` (same heads, other windows) keeping the fewest entries."""
    kept = torch.stack([s.kept_entries() for s in sels])  # (K, B, H)
    best = kept.argmin(0)
    B, H = best.shape
    first = sels[0]
    seg = first.segment
    C = max(s.cols.shape[-1] for s in sels)
    shape = (B, H, first.segments, C) if seg else (B, H, C)
    dev = first.cols.device
    cols = torch.full(shape, first.seq_len, dtype=torch.int32, device=dev)
    ncols = torch.zeros(first.ncols.shape, dtype=torch.int32, device=dev)
    window = torch.zeros(B, H, dtype=torch.int32, device=dev)
    for b in range(B):
        for h in range(H):
            s = sels[int(best[b, h])]
            window[b, h] = s.window[b, h]
            cols[b, h, ..., : s.cols.shape[-1]] = s.cols[b, h]
            ncols[b, h] = s.ncols[b, h]
    return Selection(window=window, cols=cols, ncols=ncols, seq_len=first.seq_len, segment=seg)


def select_window_per_head(q, k, scale: float, *, alpha: float, window: float, sample_ratio: float,
                           chunk: int = 0) -> Selection:
    S = q.shape[2]
    sels = []
    for w in segment_windows(window, S, DEFAULT_SEGMENTS):  # powers of two, 16 .. 4 x window x S
        if chunk:
            sels.append(select_chunked(q, k, scale, alpha=alpha, window=w / S, sample_ratio=sample_ratio,
                                       chunk=chunk, halo=0.0))
        else:
            sels.append(select_global(q, k, scale, alpha=alpha, window=window, sample_ratio=sample_ratio,
                                      window_tokens=w))
    return pick_per_head(sels)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", required=True)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--alphas", default="0.95,0.96,0.97,0.98")
    ap.add_argument("--chunks", default="2048,1024,512")
    ap.add_argument("--halos", default="0")
    ap.add_argument("--window-per-head", default="", help="chunk sizes (0: one list per head) to also run "
                    "with a window per head")
    ap.add_argument("--sample-ratio", type=float, default=0.02)
    ap.add_argument("--window", type=float, default=0.05)
    ap.add_argument("--layers", default=None, help="e.g. 0-29")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rope-scale", default="none")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    alphas = [float(x) for x in a.alphas.split(",")]
    chunks = [int(x) for x in a.chunks.split(",") if x]
    halos = [float(x) for x in a.halos.split(",")]
    settings = load_settings({"device": a.device, "rope_scale": a.rope_scale}, environ={})
    loader = ev.ModelCache(settings)
    lm = loader.get(a.length)
    ids = ev.text_tokens(lm.tokenizer, ev.read_text(Path(a.text)), a.length, source=a.text)
    selectors: dict[str, Any] = {}
    kw = {"window": a.window, "sample_ratio": a.sample_ratio}
    for al in alphas:
        selectors[f"global a{al}"] = lambda q, k, v, s, al=al: select_global(q, k, s, alpha=al, **kw)
        for c in chunks:
            for h in halos:
                selectors[f"chunk{c} halo{h} a{al}"] = (
                    lambda q, k, v, s, al=al, c=c, h=h: select_chunked(q, k, s, alpha=al, chunk=c, halo=h, **kw))
        for c in [int(x) for x in a.window_per_head.split(",") if x]:
            selectors[f"window per head, chunk{c} a{al}"] = (
                lambda q, k, v, s, al=al, c=c: select_window_per_head(q, k, s, alpha=al, chunk=c, **kw))
    layers = None
    if a.layers:
        lo, hi = (int(x) for x in a.layers.split("-"))
        layers = list(range(lo, hi + 1))
    t0 = time.time()
    res = ev.measure_fidelity(lm.model, ids, selectors, alphas[0], layers=layers, oracle=False,
                              on_layer=lambda d, n: print(f"layer {d}/{n} {time.time() - t0:.0f}s", file=sys.stderr))
    out = {
        "command": " ".join(["python"] + sys.argv),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": ev.device_description(next(lm.model.parameters()).device),
        "torch": torch.__version__,
        "rope_scale": a.rope_scale,
        "length": int(ids.shape[1]),
        "sample_ratio": a.sample_ratio,
        "window": a.window,
        "seconds": round(time.time() - t0, 1),
        "summary": {name: r.summary() for name, r in res.items()},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    for name, r in res.items():
        s = r.summary()
        print(f"{name:28s} density {s['density_mean']:.4f} err {s['err_mean']:.4f} max {s['err_max']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
