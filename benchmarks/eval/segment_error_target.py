"""Where a head starts and what error its check allows: the segments rule's alpha and max_error
together, every head and layer at 8K, CPU.

    SACLI_HOME=... python benchmarks/eval/segment_error_target.py 8192 all a0.98_e0.08_l5 a0.9_e0.04_l7 ...

A config name a<alpha>_e<max_error>_l<alpha_levels>[_s<sample_ratio>][_h<halo>][_n<segment>][_local]
[_res|_novw] runs `select_segments` with that alpha (where every head starts),
SegmentConfig(max_error, alpha_levels, halo (default 0.5), segment (default 128), local (levels
per segment), residual_values / value_weighted=False), window 0.05 and that sample ratio
(default 0.05);
measured by sacli.evaluate.measure_fidelity over every row. Output: segment_error_target_8k_cpu.txt.

    DEVICE=cuda TEXT=book.txt OUT=results.json python benchmarks/eval/segment_error_target.py 32768 all CONFIG...

runs on the GPU (bf16, YaRN past the trained 8K) and writes the summaries, each head's (layer,
head, window, density, error) and the run's device, versions, date and command as JSON.
"""

import json
import os
import re
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


def selector(name: str):
    m = re.fullmatch(r"a([0-9.]+)_e([0-9.]+)_l([0-9]+)(?:_s([0-9.]+))?(?:_h([0-9.]+))?(?:_n([0-9]+))?(_local)?(_res|_novw)?", name)
    assert m, f"config name a<alpha>_e<max_error>_l<levels>[_s<sample_ratio>][_h<halo>][_n<segment>][_local][_res|_novw] expected, got {name}"
    alpha, err, levels = float(m[1]), float(m[2]), int(m[3])
    sr = float(m[4]) if m[4] else 0.05
    cfg = SegmentConfig(max_error=err, alpha_levels=levels, halo=float(m[5]) if m[5] else 0.5,
                        segment=int(m[6]) if m[6] else 128,
                        **({"local": True} if m[7] else {}),
                        # _res: with v11_segments_residual_values.patch
                        **({"residual_values": True} if m[8] == "_res" else {}),
                        **({"value_weighted": False} if m[8] == "_novw" else {}))  # _local: with v11_segments_local_levels.patch
    return lambda q, k, v, scale: select_segments(q, k, v, alpha=alpha, window=0.05, sample_ratio=sr, scale=scale, config=cfg)


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
