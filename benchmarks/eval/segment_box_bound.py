"""Can a bound, rather than a sample, tell which far keys a segment of query rows may need? (8K, CPU)

For a group of g consecutive query rows, the elementwise min and max of their scaled queries
bound every row's logit on key j from above: U_j = sum_d max(q_min_d k_jd, q_max_d k_jd)
(one matrix product on the positive and negative parts of K, no exponential). With each row's
log-normaliser lse_r, exp(U_j - lse_r) bounds the row's attention on j, so dropping the keys
whose bounds sum to at most eps keeps at least 1 - eps of every row's mass: a selection with a
guarantee for every row, not only the sampled ones. This script measures how tight the bound
is: per segment of 128 rows (window w; keys within reach of the band counted as kept), the
fewest far keys such that every row's dropped bound sum stays <= eps, against the same
procedure run on the exact attention (what the bound would give if it were tight). The exact
lse is used, the most favourable case (a rule would only have a lower bound).

    python benchmarks/eval/segment_box_bound.py --text ../shared/books/moby_dick_2701.txt \
        --layer 18 --heads 6,7,8 --window 256 --eps 0.05 --groups 1,2,8
"""

import argparse
import math
from pathlib import Path

import torch

# this folder, on sys.path when run as a script
from segment_estimators import capture_layers

torch.set_grad_enabled(False)
SEG = 128


def densities(Q, K, w, eps, g):
    """(density from the box bound, density from the exact attention) for one head."""
    S, D = Q.shape
    L = Q @ K.T
    i = torch.arange(S)
    L.masked_fill_(i[:, None] < i[None, :], -math.inf)
    lse = torch.logsumexp(L, 1)
    P = torch.exp(L - lse[:, None])
    del L
    Kp, Km = K.clamp(min=0), K.clamp(max=0)
    kept = {"bound": 0, "exact": 0}
    far_total = 0
    for a in range(0, S - SEG + 1, SEG):
        nfar = a - w + 1  # keys outside the band of every row of the segment
        if nfar <= 0:
            continue
        boxes = Q[a : a + SEG].view(SEG // g, g, D)
        U = boxes.amax(1) @ Kp[:nfar].T + boxes.amin(1) @ Km[:nfar].T  # (SEG / g, nfar)
        bound = torch.exp(U.repeat_interleave(g, 0) - lse[a : a + SEG, None])
        for name, M in (("bound", bound), ("exact", P[a : a + SEG, :nfar])):
            order = M.amax(0).argsort()  # least needed keys first
            dropped = int((M[:, order].cumsum(1).amax(0) <= eps).sum())
            kept[name] += (nfar - dropped) * SEG
        far_total += nfar * SEG
    causal = S * (S + 1) / 2
    return ((causal - far_total + kept["bound"]) / causal, (causal - far_total + kept["exact"]) / causal)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--layer", type=int, default=18)
    ap.add_argument("--heads", default="6,7,8")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--groups", default="1,2,8", help="rows per box (1: the exact logits)")
    args = ap.parse_args()
    q, k, _, scale = capture_layers(args.text, args.length, [args.layer])[args.layer]
    G = q.shape[0] // k.shape[0]
    for h in (int(x) for x in args.heads.split(",")):
        for g in (int(x) for x in args.groups.split(",")):
            db, de = densities(q[h].float() * scale, k[h // G].float(), args.window, args.eps, g)
            print(f"L{args.layer}.H{h} window {args.window} eps {args.eps} rows per box {g}: "
                  f"density from the bound {db:.3f}, from the exact attention {de:.3f}", flush=True)


if __name__ == "__main__":
    main()
