"""How sparse can a window + column (+ diagonal) selection be, with full knowledge of the attention?

For each head of the chosen layers, from the exact attention P of one prefill (all rows), an
oracle picks, for every candidate window w, the key columns (and, in the second family, the
diagonals i - j = d >= w) greedily by the attention mass they add per kept entry, until the mean
kept mass per row reaches alpha; the window keeping the fewest entries wins. No sampling rule can
do better with this structure than this oracle (up to the greedy choice). Reported per alpha:
kept density and the relative output error ||O_sel - O|| / ||O|| (as `sacli eval fidelity`), per
head and averaged, beside the per-row oracle (each row its own top entries), which no structured
selection reaches.

    python benchmarks/eval/structure_bound.py --text ../shared/books/moby_dick_2701.txt \
        --length 8K --layers 5,15,25 --alphas 0.95,0.98 --out benchmarks/eval/structure_bound_8k_cpu.json

float32, one head at a time: S x S probabilities (256 MiB at 8K, 4 GiB at 32K) plus a few more
S x S tensors, two of them int64 (8 GiB each at 32K), ~40 GB at 32K in all; `--device cuda`
for long inputs (fits an 80 GB H100):

    python benchmarks/eval/structure_bound.py --text moby_dick_2701.txt --length 32K --layers 5,15,25 \
        --alphas 0.95,0.98,0.99 --device cuda --out structure_bound_32k_gpu.json

`--block-columns 128` adds a family whose columns are chosen per block of 128 query rows (the
sparse kernel's program size) instead of per head: what a selection that varies along the
sequence could reach with the same window (`--only-block-columns`: that family alone).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

import sacli.evaluate as ev
from sacli.config import load_settings
from sacli.eval_capture import capture_attention
from sacli.eval_metrics import causal_entries, oracle_row_counts

WINDOWS = (16, 64, 256, 1024)
ROUND = 512  # items taken per greedy round before masses are recomputed on what is left


def _select(P: torch.Tensor, alpha: float, diagonals: bool) -> torch.Tensor:
    """(S, S) bool mask of the best window + greedy columns (+ diagonals) reaching mean mass alpha."""
    S = P.shape[0]
    i = torch.arange(S, device=P.device)
    dist = i[:, None] - i[None, :]
    causal = dist >= 0
    gather_idx = (i[:, None] - i[None, :]).clamp(min=0)  # row r, offset d -> column r - d
    best: tuple[float, torch.Tensor] | None = None
    for w in WINDOWS:
        mask = causal & (dist < w)
        residual = P * (dist >= w)
        need = alpha - float((P * mask).sum()) / S
        col_cost = (S - i - w).clamp(min=1).double()
        diag_cost = (S - i).double()
        diag_cost[:w] = math.inf
        while need > 0:
            masses = [residual.sum(0).double() / S]
            costs = [col_cost]
            if diagonals:
                dm = (residual.gather(1, gather_idx) * causal).sum(0).double() / S
                dm[:w] = 0
                masses.append(dm)
                costs.append(diag_cost)
            m, c = torch.cat(masses), torch.cat(costs)
            order = torch.argsort(m / c, descending=True)[:ROUND]
            order = order[m[order] > 0]
            if order.numel() == 0:
                break
            taken = m[order].cumsum(0)
            need_t = torch.tensor([need], dtype=taken.dtype, device=taken.device)
            n = min(int(torch.searchsorted(taken, need_t)[0]) + 1, order.numel())
            order = order[:n]
            need -= float(m[order].sum())
            for item in order.tolist():
                if item < S:
                    mask[:, item] |= causal[:, item]
                    residual[:, item] = 0
                else:
                    d = item - S
                    r = torch.arange(d, S, device=P.device)
                    mask[r, r - d] = True
                    residual[r, r - d] = 0
        kept = float(mask.sum())
        if best is None or kept < best[0]:
            best = (kept, mask)
    assert best is not None
    return best[1]


def _select_block_columns(P: torch.Tensor, alpha: float, block: int) -> torch.Tensor:
    """(S, S) bool mask: a window shared by the head plus, for every block of `block` query rows,
    its own fewest columns (by the block's residual mass) that bring the block's mean kept mass
    to alpha; the window keeping the fewest entries wins."""
    S = P.shape[0]
    i = torch.arange(S, device=P.device)
    dist = i[:, None] - i[None, :]
    causal = dist >= 0
    best: tuple[float, torch.Tensor] | None = None
    for w in WINDOWS:
        mask = causal & (dist < w)
        for r0 in range(0, S, block):
            r1 = min(r0 + block, S)
            rows = r1 - r0
            beyond = dist[r0:r1] >= w
            residual = P[r0:r1] * beyond
            need = alpha * rows - float((P[r0:r1] * mask[r0:r1]).sum())
            if need <= 0:
                continue
            mass = residual.sum(0).double()
            order = torch.argsort(mass, descending=True)
            taken = mass[order].cumsum(0)
            n = min(int(torch.searchsorted(taken, torch.tensor([need], dtype=taken.dtype, device=taken.device))[0]) + 1,
                    int((mass > 0).sum()))
            cols = order[:n]
            mask[r0:r1, cols] |= beyond[:, cols]
        kept = float(mask.sum())
        if best is None or kept < best[0]:
            best = (kept, mask)
    assert best is not None
    return best[1]


def _error(P: torch.Tensor, mask: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> float:
    Pm = P * mask
    o = (Pm / Pm.sum(-1, keepdim=True).clamp_min(1e-30)) @ v
    return float((o - out).norm() / out.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--length", default="8K")
    ap.add_argument("--layers", default="0,5,10,15,20,25")
    ap.add_argument("--alphas", default="0.95,0.98,0.99")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the model and the oracle)")
    ap.add_argument("--no-diagonals", action="store_true", help="skip the window+columns+diagonals family")
    ap.add_argument("--block-columns", type=int, default=0,
                    help="also a family with columns chosen per block of this many query rows (0: no)")
    ap.add_argument("--only-block-columns", action="store_true", help="skip the head-wide families")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    settings = load_settings({"device": args.device, "dtype": "auto", "rope_scale": "yarn"}, environ={})
    # (name, oracle(P, alpha) -> kept mask)
    families: list[tuple[str, Callable[[torch.Tensor, float], torch.Tensor]]] = []
    if not args.only_block_columns:
        families.append(("window+columns", lambda P, a: _select(P, a, False)))
        if not args.no_diagonals:
            families.append(("window+columns+diagonals", lambda P, a: _select(P, a, True)))
    if args.block_columns:
        families.append((f"window+columns per {args.block_columns} rows",
                         lambda P, a: _select_block_columns(P, a, args.block_columns)))
    (S,) = ev.parse_lengths(args.length)
    layers = [int(x) for x in args.layers.split(",")]
    alphas = ev.parse_floats(args.alphas, "--alphas")
    cache = ev.ModelCache(settings, lambda m: print(m, file=sys.stderr))
    ids = ev.text_tokens(cache.tokenizer, ev.read_text(args.text), S, source=str(args.text))
    lm = cache.get(S)
    header = ev.run_header(settings, lm.device, lm.name)
    captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = {}

    def on_layer(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> None:
        if layer in layers:
            captured[layer] = (q[0].float().clone(), k[0].float().clone(), v[0].float().clone(), scale)
            if args.device != "cpu":
                torch.cuda.empty_cache()

    with torch.inference_mode(), capture_attention(lm.model, on_layer):
        lm.model(input_ids=ids.to(lm.device), use_cache=False, logits_to_keep=1)
    heads: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    causal = causal_entries(S)
    for layer in layers:
        q, k, v, scale = captured[layer]
        G = q.shape[0] // k.shape[0]
        for h in range(q.shape[0]):
            kh, vh = k[h // G], v[h // G]
            logits = (q[h] @ kh.T) * scale
            logits.masked_fill_(torch.ones(S, S, dtype=torch.bool, device=logits.device).triu(1), -math.inf)
            P = torch.softmax(logits, -1)
            out = P @ vh
            rec: dict[str, Any] = {"layer": layer, "head": h}
            for a in alphas:
                rec[f"row_oracle_density@{a}"] = float(oracle_row_counts(P, a).sum()) / causal
                for fam, oracle in families:
                    mask = oracle(P, a)
                    rec[f"{fam}@{a}"] = {"density": float(mask.sum()) / causal, "err": _error(P, mask, vh, out)}
            heads.append(rec)
            print(f"L{layer}.H{h} {time.perf_counter() - t0:.0f}s "
                  + " ".join(f"{key}={val['density']:.3f}/{val['err']:.3f}" for key, val in rec.items() if isinstance(val, dict)),
                  file=sys.stderr, flush=True)
    summary: dict[str, Any] = {}
    for a in alphas:
        summary[f"row_oracle_density@{a}"] = statistics.fmean(r[f"row_oracle_density@{a}"] for r in heads)
        for fam, _ in families:
            key = f"{fam}@{a}"
            errs = [r[key]["err"] for r in heads]
            summary[key] = {"density_mean": statistics.fmean(r[key]["density"] for r in heads),
                            "err_mean": statistics.fmean(errs), "err_max": max(errs)}
    ev.write_json(args.out, ev.rounded({**header, "command": " ".join(sys.argv), "text": args.text.name,
                                        "length": S, "layers": layers, "windows": list(WINDOWS),
                                        "summary": summary, "heads": heads}))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
