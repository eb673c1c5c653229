"""The segments rule's stage 1 before and after a rewrite that must not change what it selects:
on every layer of one dense prefill of the default model (Moby Dick, YaRN past 8K), both
`select_segments` versions run on the layer's captured Q/K/V; the script records whether their
selections are equal (window, columns, counts) and each version's time per layer.

    DEVICE=cuda TEXT=book.txt python3 benchmarks/experiments/segments_speed_ab.py OLD_RULES.py OUT.json 16384,32768 [alpha ...]

OLD_RULES.py: the earlier kernels/rules.py (e.g. `git show 2218228:kernels/rules.py`), its
relative import made absolute.
"""

import importlib.util
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from sacli.kernels import rules as new

import sacli.evaluate as ev
from sacli.config import load_settings
from sacli.eval_capture import capture_attention

torch.set_grad_enabled(False)
old_path, out, lengths = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
alphas = [float(a) for a in sys.argv[4:]] or [0.98]
src = Path(old_path).read_text().replace("from .selection import", "from sacli.kernels.selection import")
tmp = Path(out).with_suffix(".old_rules.py")
tmp.write_text(src)
spec = importlib.util.spec_from_file_location("rules_old", tmp)
old = importlib.util.module_from_spec(spec)
sys.modules["rules_old"] = old
spec.loader.exec_module(old)

device = os.environ.get("DEVICE", "cpu")
settings = load_settings({"device": device, "dtype": "auto", "rope_scale": "yarn"}, environ={})
cache = ev.ModelCache(settings, lambda m: print(m, file=sys.stderr))
text = Path(os.environ.get("TEXT", "../shared/books/moby_dick_2701.txt"))


def timed(fn):
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    r = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return r, (time.perf_counter() - t) * 1e3


runs = []
for S in lengths:
    ids = ev.text_tokens(cache.tokenizer, ev.read_text(text), S, source=str(text))
    lm = cache.get(S)
    for alpha in alphas:
        layers = []

        def on_layer(layer, q, k, v, scale, alpha=alpha, layers=layers):
            kw = {"alpha": alpha, "window": 0.05, "sample_ratio": 0.05, "scale": scale}
            a, ta = timed(lambda: old.select_segments(q, k, v, **kw))
            b, tb = timed(lambda: new.select_segments(q, k, v, **kw))
            _, ta2 = timed(lambda: old.select_segments(q, k, v, **kw))  # second round: both warm
            _, tb2 = timed(lambda: new.select_segments(q, k, v, **kw))
            equal = all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("window", "cols", "ncols"))
            layers.append({"layer": layer, "equal": equal, "old_ms": min(ta, ta2), "new_ms": min(tb, tb2),
                           "density_old": float(a.density().mean()), "density_new": float(b.density().mean())})

        with capture_attention(lm.model, on_layer):
            lm.model(ids.to(lm.model.device))
        row = {"seq_len": S, "alpha": alpha, "layers_equal": sum(x["equal"] for x in layers), "layers": len(layers),
               "old_ms_total": sum(x["old_ms"] for x in layers), "new_ms_total": sum(x["new_ms"] for x in layers),
               "old_ms_median": statistics.median(x["old_ms"] for x in layers),
               "new_ms_median": statistics.median(x["new_ms"] for x in layers), "per_layer": layers}
        runs.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "per_layer"}), flush=True)
dev = torch.device("cuda" if device == "cuda" else "cpu")
ev.write_json(Path(out), {"command": " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          "device": ev.device_description(dev), "torch": torch.__version__, "text": text.name, "runs": runs})
tmp.unlink()
