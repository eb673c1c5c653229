"""Is dense's greedy answer in a needle cell the same every time? One process runs the cells of
`sacli eval niah`'s grid given by their index (the grid's own needle seeds), in the order given,
repeats allowed, each with dense and sparse answers, and writes every answer as JSON.

    DEVICE=cuda TEXT=book.txt OUT=out.json python3 benchmarks/eval/niah_dense_repeat.py 16384 17,17,16,17 \
        --rule segments --alpha 0.965 --sample-ratio 0.5 --sampled-levels 1

The cell index n is the one `sacli eval niah --lengths 2K,4K,8K,16K --depths 0.1,0.3,0.5,0.7,0.9`
gives (16K at depth 0.5 is 17); its depth is DEPTHS[n % 5].
"""

import argparse
import os
import sys
from pathlib import Path


import sacli.evaluate as ev
from sacli.config import Settings, load_settings

DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]


def add_rule_arguments(ap: argparse.ArgumentParser, alpha: float) -> None:
    """The sparse rule's options shared by the needle-cell scripts."""
    ap.add_argument("--rule", default="segments")
    ap.add_argument("--alpha", type=float, default=alpha)
    ap.add_argument("--sample-ratio", type=float, default=0.5)
    ap.add_argument("--sampled-levels", type=int, default=1)


def rule_knobs(args: argparse.Namespace) -> dict:
    return {"alpha": args.alpha, "sample_ratio": args.sample_ratio, "sampled_levels": args.sampled_levels}


def grid_settings(device: str, **knobs) -> Settings:
    """Settings as `sacli eval niah` runs a cell: YaRN, sparse at every length, greedy answers of
    up to 32 tokens; knobs override."""
    return load_settings({"device": device, "dtype": "auto", "rope_scale": "yarn", "dense_below": 0, "max_new_tokens": 32,
                          "temperature": 0.0, **knobs}, environ={})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("length", type=int)
    ap.add_argument("cells", help="grid indices, comma-separated, in run order")
    add_rule_arguments(ap, alpha=0.965)
    args = ap.parse_args()
    device = os.environ.get("DEVICE", "cpu")
    settings = grid_settings(device, **rule_knobs(args))
    cache = ev.ModelCache(settings, lambda m: print(m, file=sys.stderr))
    text = Path(os.environ.get("TEXT", "../shared/books/moby_dick_2701.txt"))
    book = ev.read_text(text)
    lm = cache.get(args.length + settings.max_new_tokens)
    runs = []
    for n in (int(x) for x in args.cells.split(",")):
        cell = ev.niah_cells(lm, book, args.length, DEPTHS[n % 5], settings, [args.rule], seed=n)[0]
        runs.append({"cell": n, "depth": cell.depth, "number": cell.number, "dense": cell.dense_answer,
                     "sparse": cell.sparse_answer})
        print(runs[-1], flush=True)
    if os.environ.get("OUT"):
        ev.write_json(Path(os.environ["OUT"]), {**ev.run_header(settings, lm.device, lm.name), "rule": args.rule,
                                                "text": text.name, "runs": runs})


if __name__ == "__main__":
    main()
