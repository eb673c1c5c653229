"""The segments rule's alpha levels, error ratio and halo on the hardest layers (7/17/18/20/23) at 8K, CPU.

    SACLI_HOME=... python benchmarks/eval/segment_levels.py 8192 7,17,18,20,23

Each config is a SegmentConfig (alpha_levels, error_ratio, halo); alpha 0.98, window and sample
ratio 0.05; measured by sacli.evaluate.measure_fidelity over every row. Output of the run behind
the defaults: segment_levels_8k_cpu.txt.
"""

import sys, torch, statistics as st
from pathlib import Path
import sacli.evaluate as ev
from sacli.config import load_settings
from sacli.kernels.rules import select_segments, SegmentConfig
torch.set_grad_enabled(False)
S = int(sys.argv[1]); layers = [int(x) for x in sys.argv[2].split(",")]
settings = load_settings({"device": "cpu", "dtype": "auto", "rope_scale": "yarn"}, environ={})
cache = ev.ModelCache(settings, lambda m: print(m, file=sys.stderr))
text = Path("../shared/books/moby_dick_2701.txt")
ids = ev.text_tokens(cache.tokenizer, ev.read_text(text), S, source=str(text))
lm = cache.get(S)
cfgs = {f"L{l}_r{r}_h{h}": SegmentConfig(alpha_levels=l, error_ratio=r, halo=h) for l, r, h in [(3, 4.0, 0.5), (5, 4.0, 0.5), (5, 6.0, 0.5), (3, 4.0, 0.25)]}
sel = {name: (lambda q, k, v, scale, c=c: select_segments(q, k, v, alpha=0.98, window=0.05, sample_ratio=0.05, scale=scale, config=c)) for name, c in cfgs.items()}
res = ev.measure_fidelity(lm.model, ids, sel, 0.98, layers=layers, oracle=False)
for name, r in res.items():
    H = r.heads
    print(name, "density %.3f err %.4f max %.3f dense %d" % (st.fmean(h.density for h in H), st.fmean(h.err for h in H), max(h.err for h in H), sum(h.window >= S for h in H)))
