"""Where the sparse kernel's time goes: a least-squares fit of per-program costs.

`python benchmarks/tile_fit.py RUN.json [OUT.json]` (CPU; RUN.json from `sacli bench attention
--workload synthetic`, one length). For each of the run's selections it rebuilds the same
synthetic selection (same seed), counts the tiles a 128 x 128 program visits per query block
(band tiles, column tiles, masked or not), takes a program's time as the kernel time over the
programs each SM runs, and fits

    microseconds per program  =  a * band tiles  +  c * column tiles  +  f

over the selections: a and c are the microseconds one tile costs, f the fixed cost of a program
(prologue, epilogue, the extra work of masked edge tiles). Prints the fit and writes it as JSON.
"""

from __future__ import annotations

import json
import sys

import torch

from sacli.bench import synthetic_selection
from sacli.kernels.triton_sparse import column_counts

BLOCK_M = 128
BLOCK_N = 128
SMS = 132


def tiles_per_program(sel, S: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Mean (band tiles, column tiles) a program of BLOCK_M rows visits for this selection."""
    counts = column_counts(sel, BLOCK_M).long()
    w = sel.window.reshape(-1, 1).long()
    m0 = torch.arange(counts.shape[1]) * BLOCK_M
    m1 = m0 + BLOCK_M
    lo = (m0[None, :] - w + 1).clamp(min=0)
    hi = m1.clamp(max=S)[None, :]
    band = (hi - lo + BLOCK_N - 1) // BLOCK_N
    cols = (counts[..., 1] + BLOCK_N - 1) // BLOCK_N
    return float(band.float().mean()), float(cols.float().mean())


def main(path: str, out: str | None) -> None:
    run = json.load(open(path, encoding="utf-8"))
    shape = run["shape"]
    result = run["results"][0]
    S, H = result["seq_len"], shape["heads"]
    programs_per_sm = H * (S // BLOCK_M) / SMS
    rows, times, labels = [], [], []
    for entry in result["sparse"]:
        if entry["label"] == "peer":
            sel = synthetic_selection(1, H, S, window=entry["window"], ncols=round(entry["mean_columns"]), device="cpu")
        else:
            sel = synthetic_selection(1, H, S, density=float(entry["label"]), device="cpu")
        band, cols = tiles_per_program(sel, S)
        rows.append([band, cols, 1.0])
        times.append(entry["sparse_kernel_ms"] * 1e3 / programs_per_sm)  # us per program
        labels.append(entry["label"])
    x = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(times, dtype=torch.float64)
    coef = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
    fit = {
        "source": path,
        "source_date": run["env"].get("date"),
        "us_per_band_tile": float(coef[0]),
        "us_per_column_tile": float(coef[1]),
        "us_fixed_per_program": float(coef[2]),
        "selections": [
            {"label": lab, "band_tiles": r[0], "column_tiles": r[1], "us_per_program": t, "residual_us": float(res)}
            for lab, r, t, res in zip(labels, rows, times, (x @ coef - y).tolist())
        ],
    }
    print(f"{path}: {fit['us_per_band_tile']:.2f} us per band tile, {fit['us_per_column_tile']:.2f} us per "
          f"column tile, {fit['us_fixed_per_program']:.1f} us fixed per program")
    for s in fit["selections"]:
        print(f"  {s['label']:>5}: {s['band_tiles']:6.1f} band + {s['column_tiles']:6.1f} column tiles, "
              f"{s['us_per_program']:6.1f} us per program (residual {s['residual_us']:+.1f})")
    if out:
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(fit, fh, indent=1)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python benchmarks/tile_fit.py RUN.json [OUT.json]")
    main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None)
