"""How close to a tie are the needle cells whose dense and sparse answers differ? For every
such cell of the given `sacli eval niah` JSON files, the cell's prompt is rebuilt and both
answers are decoded again greedily while recording each step's logits. At the first step where
the two answers part, it reports dense's logit margin for its own token over sparse's token, and
sparse's margin the other way round; for scale, the median margin between the best two tokens
over dense's other steps.

    DEVICE=cuda OUT=out.json python3 benchmarks/eval/niah_margins.py \
        grid.json:0:book.txt other.json:1:other_book.txt --rule segments --alpha 0.9625

Each argument is FILE:SEED:BOOK, SEED being the run's `--seed` (cells that record their own
seed, from `--trials`, use it). The rules' knobs must be the run's. Runs under sacli eval's
deterministic mode; the settings are those of `sacli eval niah` (niah_dense_repeat.grid_settings).
"""

import argparse
import json
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

import sacli.evaluate as ev
from niah_dense_repeat import add_rule_arguments, grid_settings, rule_knobs  # this folder
from sacli.eval_rules import rule_attention, selector
from sacli.models.attention import sparse_context


@torch.inference_mode()
def greedy(lm, ids: torch.Tensor, settings, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's float32 logits (V,), as sacli's generate decodes."""
    from transformers import DynamicCache

    from sacli.models.generate import cache_argument, eos_token_ids

    eos = eos_token_ids(lm)
    with sparse_context(settings):
        with_cache = {cache_argument(lm.model): DynamicCache(config=lm.model.config), "use_cache": True}
        out = lm.model(input_ids=ids.to(lm.device), **with_cache, logits_to_keep=1)
        tokens, logits = [], []
        for _ in range(steps):
            row = out.logits[0, -1].float()
            tok = int(row.argmax())
            tokens.append(tok)
            logits.append(row.cpu())
            if tok in eos:
                break
            out = lm.model(input_ids=torch.tensor([[tok]], device=lm.device), **with_cache)
    return tokens, logits


def decode(lm, tokens: list[int]) -> str:
    """The answer text as `sacli eval niah` records it."""
    return lm.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def answer(lm, ids, settings, rule: str | None) -> tuple[list[int], list[torch.Tensor]]:
    dense = replace(settings, dense=True)
    if rule is None:
        return greedy(lm, ids, dense, settings.max_new_tokens)
    with rule_attention(lm.model, selector(rule, settings), settings.dense_below):
        return greedy(lm, ids, dense, settings.max_new_tokens)


def cells_to_check(path: Path, seed: int) -> list[tuple[int, int, dict]]:
    """(needle seed, grid index n, cell) of every cell whose answers differ."""
    data = json.loads(path.read_text())
    run = data["runs"][0] if "runs" in data else data  # files from before `--rule` repeated: one run
    cells = run["cells"]
    trials = len({c.get("seed", seed) for c in cells})
    return [(c.get("seed", seed), i // trials, c) for i, c in enumerate(cells) if not c["agree"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="FILE:SEED:BOOK")
    add_rule_arguments(ap, alpha=0.9625)
    args = ap.parse_args()
    device = os.environ.get("DEVICE", "cpu")
    settings = grid_settings(device, **rule_knobs(args))
    cache = ev.ModelCache(settings, lambda m: print(m, file=sys.stderr))
    results = []
    with ev.deterministic():
        header = ev.run_header(settings, torch.device("cuda" if device == "cuda" else "cpu"), settings.model)
        for spec in args.runs:
            file, seed, book_path = spec.split(":")
            book = ev.read_text(Path(book_path))
            for needle_seed, n, cell in cells_to_check(Path(file), int(seed)):
                S = cell["length"]
                lm = cache.get(S + settings.max_new_tokens)
                prompt = ev.niah_prompt(lm.tokenizer, book, S, cell["depth"], settings, needle_seed * 100_003 + n)
                d_tok, d_log = answer(lm, prompt.ids, settings, None)
                s_tok, s_log = answer(lm, prompt.ids, settings, args.rule)
                k = next((i for i, (a, b) in enumerate(zip(d_tok, s_tok)) if a != b), None)
                top2 = [x.topk(2).values for i, x in enumerate(d_log) if i != k]
                gaps = [float(v[0] - v[1]) for v in top2]
                row = {
                    "file": Path(file).name, "length": S, "depth": cell["depth"], "seed": needle_seed,
                    "dense_reproduced": decode(lm, d_tok) == cell["dense_answer"],
                    "sparse_reproduced": decode(lm, s_tok) == cell["sparse_answer"],
                    "step": k,
                    "dense_token": lm.tokenizer.decode([d_tok[k]]) if k is not None else None,
                    "sparse_token": lm.tokenizer.decode([s_tok[k]]) if k is not None else None,
                    "dense_margin": float(d_log[k][d_tok[k]] - d_log[k][s_tok[k]]) if k is not None else None,
                    "sparse_margin": float(s_log[k][s_tok[k]] - s_log[k][d_tok[k]]) if k is not None else None,
                    "dense_median_top2_gap": statistics.median(gaps) if gaps else None,
                }
                results.append(row)
                print(row, flush=True)
    if os.environ.get("OUT"):
        ev.write_json(Path(os.environ["OUT"]), {**header, "rule": args.rule, "cells": results})


if __name__ == "__main__":
    main()
