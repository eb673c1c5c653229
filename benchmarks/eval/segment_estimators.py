"""Estimators of per-segment columns from sampled rows, against the exact attention (8K, CPU).

The exploration behind the `segments` rule's design (kernels/rules.select_segments): for layers
5, 15 and 25 of the default model on Moby Dick, every head's exact attention P is computed; each
segment of `seg` query rows gets columns chosen from `rows` sampled rows of its own (strided,
each stride's last row), optionally smoothed with its neighbours' (`halo` 1: weights 0.5/1/0.5,
2: 0.25/0.5/1/0.5/0.25), value-weighted (`vw`) and mixed with the head-wide mean (`glob`); the
window per head is the one of 16/64/256/1024 keeping the fewest entries. Reported: kept density
and the relative output error over all rows (as `sacli eval fidelity`). Unlike the rule, no
held-out check, no dense fallback, and columns past a segment's reach are not masked out.
An optional seventh field picks the sampled rows: `stride` (default, as above) or `diverse`
(farthest-point sampling of the segment's scaled queries, starting from its last row; each
picked row weighs the share of the segment's rows nearest to it) or `diverse_dir` (the same
on unit-length queries).

    python benchmarks/eval/segment_estimators.py --text ../shared/books/moby_dick_2701.txt \
        128:8:0.98:1:1:0 128:16:0.97:1:1:0 ...   (seg:rows:alpha:halo:vw:glob)

Results of the runs that chose the defaults: segment_estimators_8k_cpu.txt.
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sacli.evaluate as ev
from sacli.config import load_settings
from sacli.eval_capture import capture_attention

torch.set_grad_enabled(False)
WINDOWS = (16, 64, 256, 1024)
def smooth(x, kern):
    # x (nseg, ...) smoothed along segments with normalized kernel
    k = torch.tensor(kern, dtype=x.dtype); r = len(kern) // 2
    nseg = x.shape[0]
    flat = x.reshape(nseg, -1).T[:, None, :]
    y = F.conv1d(F.pad(flat, (r, r)), k.view(1, 1, -1))[:, 0].T
    cnt = F.conv1d(F.pad(torch.ones(1, 1, nseg, dtype=x.dtype), (r, r)), k.view(1, 1, -1))[0, 0]
    return (y / cnt[:, None]).reshape(x.shape)
def pick_rows(qs, seg, rps, pick):
    """(nseg, rps) sampled rows of each segment and (nseg, rps) weights summing to 1."""
    S = qs.shape[0]
    nseg = (S + seg - 1) // seg
    stride = seg // rps
    if pick == "stride":
        rows = (torch.arange(nseg)[:, None] * seg + torch.arange(rps)[None, :] * stride + stride - 1).clamp(max=S - 1)
        return rows, torch.full((nseg, rps), 1.0 / rps)
    rows = torch.empty(nseg, rps, dtype=torch.long)
    wts = torch.empty(nseg, rps)
    for s in range(nseg):
        a, b = s * seg, min(S, (s + 1) * seg)
        x = F.normalize(qs[a:b], dim=-1) if pick == "diverse_dir" else qs[a:b]
        n = x.shape[0]
        chosen = [n - 1]
        d = (x - x[n - 1]).norm(dim=-1)
        for _ in range(min(rps, n) - 1):
            j = int(d.argmax())
            chosen.append(j)
            d = torch.minimum(d, (x - x[j]).norm(dim=-1))
        chosen += [n - 1] * (rps - len(chosen))
        c = torch.tensor(chosen)
        near = torch.cdist(x, x[c]).argmin(1)
        rows[s] = a + c
        wts[s] = torch.bincount(near, minlength=rps).float() / n
    return rows, wts


def run_head(P, v, out, qs, seg, rps, alpha, halo, vw, glob, pick="stride", sinks=4):
    S = P.shape[0]
    i = torch.arange(S)
    nseg = (S + seg - 1) // seg
    rows, wts = pick_rows(qs, seg, rps, pick)
    rflat = rows.reshape(-1)
    Ps = P[rflat]
    if vw:
        Ps = Ps * v.norm(dim=-1)[None, :]
        Ps = Ps / Ps.sum(-1, keepdim=True)
    dist = rflat[:, None] - i[None, :]
    s0 = torch.arange(nseg)[:, None] * seg; s1 = (s0 + seg).clamp(max=S)
    best = None
    kern = {0: [1.0], 1: [0.5, 1.0, 0.5], 2: [0.25, 0.5, 1.0, 0.5, 0.25]}[halo]
    for w in WINDOWS:
        far = Ps * (dist >= w)
        sc = (far.view(nseg, rps, S) * wts[..., None]).sum(1)
        bm = ((1 - far.sum(-1)).view(nseg, rps) * wts).sum(1)
        if halo:
            sc = smooth(sc, kern); bm = smooth(bm, kern)
        if glob:
            sc = sc + glob * sc.mean(0, keepdim=True)
            sc = sc / (1 + glob)
        key = sc.double().clone(); key[:, :sinks] = math.inf
        key[:, S - w:] = -1.0
        need = alpha - bm
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices
        csum = sc.double().gather(-1, order).cumsum(-1)
        cnt_ = torch.searchsorted(csum, need.double()[:, None].contiguous()).squeeze(-1) + 1
        cnt_ = torch.maximum(cnt_.clamp(max=S), torch.tensor(sinks))
        cnt_ = torch.minimum(cnt_, (key > 0).sum(-1))
        take = torch.arange(S)[None, :] < cnt_[:, None]
        segmark = torch.zeros(nseg, S, dtype=torch.bool).scatter_(-1, order, take)
        # kept entries analytically
        first = torch.maximum(i[None, :] + w, s0)
        rowsu = (s1 - first).clamp(min=0)
        kept = w * S - w * (w - 1) / 2 + float((rowsu * segmark).sum())
        if best is None or kept < best[0]:
            best = (kept, segmark, w)
    kept, segmark, w = best
    d = i[:, None] - i[None, :]
    mask = (d >= 0) & ((d < w) | segmark[i // seg])
    Pm = P * mask
    o = (Pm / Pm.sum(-1, keepdim=True).clamp_min(1e-30)) @ v
    return float(mask.sum()) / (S * (S + 1) / 2), float((o - out).norm() / out.norm()), w


def capture_layers(text: Path, length: int, layers: list[int]) -> dict:
    """{layer: (q, k, v, scale)} of one dense CPU prefill of the first `length` tokens of
    text (bf16 copies of batch 0, (H, S, D)), YaRN past the trained context."""
    settings = load_settings({"device": "cpu", "dtype": "auto", "rope_scale": "yarn"}, environ={})
    cache = ev.ModelCache(settings, lambda m: print(m, file=sys.stderr))
    ids = ev.text_tokens(cache.tokenizer, ev.read_text(text), length, source=str(text))
    lm = cache.get(length)
    cap = {}

    def on_layer(layer, q, k, v, scale):
        if layer in layers:
            cap[layer] = tuple(t[0].to(torch.bfloat16).clone() for t in (q, k, v)) + (scale,)

    with torch.inference_mode(), capture_attention(lm.model, on_layer):
        lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return cap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--layers", default="5,15,25")
    ap.add_argument("configs", nargs="+", help="seg:rows:alpha:halo:vw:glob[:pick]")
    args = ap.parse_args()
    cap = capture_layers(args.text, args.length, [int(x) for x in args.layers.split(",")])
    configs = []
    for spec in args.configs:
        seg, rps, alpha, halo, vw, glob, *pick = spec.split(":")
        configs.append((int(seg), int(rps), float(alpha), int(halo), int(vw), float(glob), *pick))
    res = {c: [] for c in configs}
    t0 = time.time()
    for layer, (q, k, v, scale) in sorted(cap.items()):
        G = q.shape[0] // k.shape[0]
        for h in range(q.shape[0]):
            qh, kh, vh = q[h].float(), k[h // G].float(), v[h // G].float()
            S = qh.shape[0]
            logits = (qh @ kh.T) * scale
            logits.masked_fill_(torch.ones(S, S, dtype=torch.bool).triu(1), -math.inf)
            P = torch.softmax(logits, -1)
            del logits
            out = P @ vh
            for c in configs:
                res[c].append(run_head(P, vh, out, qh * scale, *c))
        print(f"layer {layer} {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    for c, r in res.items():
        d = statistics.fmean(x[0] for x in r)
        e = statistics.fmean(x[1] for x in r)
        m = max(x[1] for x in r)
        n3 = sum(x[1] <= 0.03 for x in r)
        pick = f" pick={c[6]}" if len(c) > 6 else ""
        print(f"seg={c[0]} rows={c[1]} a={c[2]} halo={c[3]} vw={c[4]} glob={c[5]}{pick}: density {d:.3f} err {e:.4f} "
              f"max {m:.3f} heads<=3% {n3}/{len(r)}")


if __name__ == "__main__":
    main()
