"""Does a needle cell's sparse answer change when the prompt's last rows attend exactly? For the
cells given (grid indices as in niah_dense_repeat.py), the dense answer, then the sparse answer
of the rule with the attention output of the last T rows of every sparse prefill replaced by
exact attention, for each T in --tails (0: the rule as it is).

    DEVICE=cuda TEXT=book.txt OUT=out.json python3 benchmarks/eval/niah_tail_exact.py 16384 19,17 \
        --tails 0,32,128 --alpha 0.9625

Runs under sacli eval's deterministic mode.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import sacli.evaluate as ev
import sacli.kernels
from niah_dense_repeat import DEPTHS, add_rule_arguments, grid_settings, rule_knobs  # this folder


def with_exact_tail(sparse_attention, tail: int):
    def run(q, k, v, sel, scale):
        out = sparse_attention(q, k, v, sel, scale)
        S = q.shape[2]
        T = min(tail, S)
        if T <= 0:
            return out
        i = torch.arange(S - T, S, device=q.device)[:, None]
        allowed = torch.arange(S, device=q.device)[None, :] <= i
        exact = F.scaled_dot_product_attention(q[:, :, S - T:], k, v, attn_mask=allowed, scale=scale,
                                               enable_gqa=q.shape[1] != k.shape[1])
        out = out.clone()
        out[:, :, S - T:] = exact.to(out.dtype)
        return out
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("length", type=int)
    ap.add_argument("cells", help="grid indices, comma-separated")
    ap.add_argument("--tails", default="0,32,128")
    add_rule_arguments(ap, alpha=0.9625)
    args = ap.parse_args()
    device = os.environ.get("DEVICE", "cpu")
    settings = grid_settings(device, **rule_knobs(args))
    text = Path(os.environ.get("TEXT", "../shared/books/moby_dick_2701.txt"))
    book = ev.read_text(text)
    original = sacli.kernels.sparse_attention
    runs = []
    with ev.deterministic():
        lm = ev.ModelCache(settings, lambda m: print(m, file=sys.stderr)).get(args.length + settings.max_new_tokens)
        header = ev.run_header(settings, lm.device, lm.name)
        for n in (int(x) for x in args.cells.split(",")):
            prompt = ev.niah_prompt(lm.tokenizer, book, args.length, DEPTHS[n % 5], settings, seed=n)
            dense, _ = ev._answer(lm, prompt.ids, settings, args.rule, dense=True)
            row = {"cell": n, "depth": DEPTHS[n % 5], "dense": dense, "sparse": {}}
            for t in (int(x) for x in args.tails.split(",")):
                sacli.kernels.sparse_attention = with_exact_tail(original, t)
                try:
                    row["sparse"][str(t)], _ = ev._answer(lm, prompt.ids, settings, args.rule, dense=False)
                finally:
                    sacli.kernels.sparse_attention = original
            runs.append(row)
            print(row, flush=True)
    if os.environ.get("OUT"):
        ev.write_json(Path(os.environ["OUT"]), {**header, "rule": args.rule,
                                                "text": text.name, "runs": runs})


if __name__ == "__main__":
    main()
