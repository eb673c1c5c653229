"""Where a head starts and what error its check allows: the segments rule's alpha and max_error
together, every head and layer at 8K, CPU.

    SACLI_HOME=... python benchmarks/eval/segment_error_target.py 8192 all a0.98_e0.08_l5 a0.9_e0.04_l7 ...

A config name such as a0.9_e0.04_l7_s0.1 runs `select_segments` with that alpha (where every
head starts), SegmentConfig fields from its other tokens (listed at `_NUMBERS` and `_FLAGS`;
unnamed fields keep their defaults), window 0.05 and sample ratio 0.05 unless named; measured by sacli.evaluate.measure_fidelity over every row. Output: segment_error_target_8k_cpu.txt.

    DEVICE=cuda TEXT=book.txt OUT=results.json python benchmarks/eval/segment_error_target.py 32768 all CONFIG...

runs on the GPU (bf16, YaRN past the trained 8K) and writes the summaries, each head's (layer,
head, window, density, error) and the run's device, versions, date and command as JSON.
"""

import json
import os
import statistics as st
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from sacli.kernels.rules import SegmentConfig, select_segments

import sacli.evaluate as ev
from sacli.config import load_settings

torch.set_grad_enabled(False)
S = int(sys.argv[1])
layers = None if sys.argv[2] == "all" else [int(x) for x in sys.argv[2].split(",")]
names = sys.argv[3:]
device = os.environ.get("DEVICE", "cpu")
settings = load_settings({"device": device, "dtype": "auto", "rope_scale": "yarn"}, environ={})
cache = ev.ModelCache(settings, lambda m: print(m, file=sys.stderr))
text = Path(os.environ.get("TEXT", "../shared/books/moby_dick_2701.txt"))
ids = ev.text_tokens(cache.tokenizer, ev.read_text(text), S, source=str(text))
lm = cache.get(S)


# config name tokens: a<alpha>, e<max_error>, l<alpha_levels>, s<sample_ratio>, h<halo>, n<segment>, b<boost_rows>,
# k<sampled_levels>,
# and the flags novw (value_weighted=False), exact (exact_fallback=True), local and res (these two need
# benchmarks/experiments/v11_segments_local_levels.patch / v11_segments_residual_values.patch;
# b needs benchmarks/experiments/v12_segments_boost_rows.patch)
_NUMBERS = {"a": ("alpha", float), "e": ("max_error", float), "l": ("alpha_levels", int), "s": ("sample_ratio", float),
            "h": ("halo", float), "n": ("segment", int), "b": ("boost_rows", int), "k": ("sampled_levels", int)}
_FLAGS = {"novw": ("value_weighted", False), "local": ("local", True), "res": ("residual_values", True),
          "exact": ("exact_fallback", True)}


def selector(name: str):
    knobs = {"sample_ratio": 0.05}
    fields = {}
    for tok in name.split("_"):
        if tok in _FLAGS:
            fields[_FLAGS[tok][0]] = _FLAGS[tok][1]
        elif tok[:1] in _NUMBERS:
            key, kind = _NUMBERS[tok[0]]
            (knobs if key in ("alpha", "sample_ratio") else fields)[key] = kind(tok[1:])
        else:
            raise SystemExit(f"unknown token {tok!r} in config name {name!r}")
    assert "alpha" in knobs, f"config name {name!r} has no a<alpha>"
    cfg = SegmentConfig(**fields)
    return lambda q, k, v, scale: select_segments(q, k, v, alpha=knobs["alpha"], window=0.05,
                                                  sample_ratio=knobs["sample_ratio"], scale=scale, config=cfg)


res = ev.measure_fidelity(lm.model, ids, {n: selector(n) for n in names}, 0.95, layers=layers, oracle=False)
summary = {}
for name, r in res.items():
    H = r.heads
    summary[name] = {"density_mean": st.fmean(h.density for h in H), "err_mean": st.fmean(h.err for h in H),
                     "err_max": max(h.err for h in H), "dense_heads": sum(h.window >= S for h in H)}
    x = summary[name]
    print(name, f"density {x['density_mean']:.4f} err {x['err_mean']:.4f} max {x['err_max']:.3f} dense {x['dense_heads']}",
          flush=True)
heads = {name: [[h.layer, h.head, h.window, round(h.density, 5), round(h.err, 5)] for h in r.heads] for name, r in res.items()}
if os.environ.get("HEADS_JSON"):
    Path(os.environ["HEADS_JSON"]).write_text(json.dumps(heads))
if os.environ.get("OUT"):
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    ev.write_json(Path(os.environ["OUT"]), {
        "command": " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": ev.device_description(dev), "torch": torch.__version__, "text": text.name, "seq_len": S,
        "summary": summary, "heads (layer, head, window, density, err)": heads})
