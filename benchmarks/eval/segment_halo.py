"""How much a segment should lean on its neighbours' sampled rows (8K, CPU).

For the given layers of one dense CPU prefill (fp32, YaRN past the trained context), the segments
rule selects with each `halo` weight given (plus the default, None: halo_rows / rows sampled per
segment) at each alpha; the selection's mean density and its heads' mean and worst relative
output error over every row (the sparse reference against dense) are printed, one line per
layer, alpha and halo.

    python benchmarks/eval/segment_halo.py --text ../shared/books/moby_dick_2701.txt \
        --layers 5,15,18,25 --alphas 0.96,0.97 --sample-ratio 0.5 --sampled-levels 1 --halos 0.5,0,default
"""

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from sacli.kernels.reference import dense_attention, sparse_attention
from sacli.kernels.rules import DEFAULT_SEGMENTS, select_segments

# this folder, on sys.path when run as a script
from segment_estimators import capture_layers

torch.set_grad_enabled(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--layers", default="5,15,18,25")
    ap.add_argument("--alphas", default="0.96,0.97")
    ap.add_argument("--sample-ratio", type=float, default=0.5)
    ap.add_argument("--sampled-levels", type=int, default=1)
    ap.add_argument("--halos", default="0.5,0,default")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    halos = [None if h == "default" else float(h) for h in args.halos.split(",")]
    cap = capture_layers(args.text, args.length, layers)
    for layer in layers:
        q, k, v = (t[None].float() for t in cap[layer][:3])
        scale = cap[layer][3]
        ref = dense_attention(q, k, v, scale)
        for alpha in (float(a) for a in args.alphas.split(",")):
            for halo in halos:
                cfg = replace(DEFAULT_SEGMENTS, sampled_levels=args.sampled_levels or None, halo=halo)
                sel = select_segments(q, k, v, alpha=alpha, window=0.05, sample_ratio=args.sample_ratio, scale=scale,
                                      config=cfg)
                out = sparse_attention(q, k, v, sel, scale)
                err = ((out - ref).flatten(2).norm(dim=-1) / ref.flatten(2).norm(dim=-1))[0]
                name = "default" if halo is None else f"{halo:g}"
                print(f"L{layer} alpha {alpha} halo {name}: density {float(sel.density().mean()):.4f} "
                      f"err mean {float(err.mean()):.4f} max {float(err.max()):.4f}", flush=True)


if __name__ == "__main__":
    main()
