"""Which layers' sparsity costs the next-token distributions most: the segments rule in one layer
only (every other layer dense), and in every layer but one, for each layer in turn, then in every
layer; KL, top-1 agreement and perplexity of the last 1024 tokens vs dense, and the mean density
over all layers (dense layers count 1).

    DEVICE=cuda TEXT=book.txt OUT=results.json python3 benchmarks/eval/layer_sensitivity_ppl.py 8192,16384 0.95 [sample_ratio]

YaRN past the trained 8K; on CUDA bf16. Default knobs of the segments rule otherwise.
"""

import os
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from sacli.kernels.rules import select_segments

import sacli.evaluate as ev
from sacli.config import load_settings
from sacli.eval_rules import every_entry

torch.set_grad_enabled(False)
lengths, alpha = [int(x) for x in sys.argv[1].split(",")], float(sys.argv[2])
sr = float(sys.argv[3]) if len(sys.argv) > 3 else 0.05
device = os.environ.get("DEVICE", "cpu")
settings = load_settings({"device": device, "dtype": "auto", "rope_scale": "yarn", "dense_below": 0}, environ={})
cache = ev.ModelCache(settings, lambda m: print(m, file=sys.stderr))
text = Path(os.environ.get("TEXT", "../shared/books/moby_dick_2701.txt"))


def selector(sparse_layers: set[int], n_layers: int):
    """Selections in call order: the model's layers run 0, 1, ... in one prefill."""
    calls = [0]

    def select(q, k, v, scale):
        layer = calls[0] % n_layers
        calls[0] += 1
        if layer not in sparse_layers:
            return every_entry(q)
        return select_segments(q, k, v, alpha=alpha, window=0.05, sample_ratio=sr, scale=scale)

    return select


runs = []
for S in lengths:
    ids = ev.text_tokens(cache.tokenizer, ev.read_text(text), S, source=str(text))
    lm = cache.get(S)
    n = int(lm.model.config.num_hidden_layers)
    every = set(range(n))
    plan = [("all", every), *((f"only {i}", {i}) for i in range(n)), *((f"all but {i}", every - {i}) for i in range(n))]
    for name, layers in plan:
        res = ev.measure_ppl(lm, ids, replace(settings, alpha=alpha), "segments", 1024, select=selector(layers, n))
        row = {"sparse_layers": name, **{k: round(v, 7) if isinstance(v, float) else v for k, v in vars(res).items() if k != "rule"}}
        runs.append(row)
        print(row, flush=True)
if os.environ.get("OUT"):
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    ev.write_json(Path(os.environ["OUT"]), {"command": " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "device": ev.device_description(dev), "torch": torch.__version__, "text": text.name, "runs": runs})
