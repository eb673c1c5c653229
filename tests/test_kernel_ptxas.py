"""The sparse kernel's matrix products stay asynchronous on Hopper.

Compiled for sm_90 with Triton's bundled ptxas (this works on a machine without a GPU), ptxas
must not report that it serialises the kernel's wgmma instructions (its warning C7515). The
loop order in `_sparse_attn_fwd` (the partial column tile before the whole ones) is what avoids
it; with the other order every config triggered the warning and the kernel ran 1-11% slower on
an H100 (docs/KERNEL_NOTES.md, v8). Each case compiles in a subprocess without the CPU
interpreter, which would otherwise replace the kernels.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

_SCRIPT = r"""
import json, os, subprocess, sys
import triton
import triton.backends.nvidia as nv
from triton.backends.compiler import GPUTarget
from sacli.kernels import triton_sparse as tsp

D, BM, BN, warps, stages, packed, merged = json.loads(sys.argv[1])
ptxas = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
if not os.path.exists(ptxas):
    print(json.dumps({"skip": "no bundled ptxas"}))
    sys.exit(0)
desc = lambda rows: f"tensordesc<bf16[1,1,{rows},{D}]>"
types = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "QD": desc(BM), "OD": desc(BM), "KD": desc(BN),
         "VD": desc(BN), "KCD": desc(BN) if packed else "constexpr", "VCD": desc(BN) if packed else "constexpr",
         "WIN": "*i32", "COLS": "*i32", "CNT": "*i32", "qk_scale": "fp32"}
consts = {"HEAD_DIM": D, "BLOCK_M": BM, "BLOCK_N": BN, "COUNT_BLOCK": 64, "UPCAST": False, "PREC": "tf32",
          "TMA": True, "PACKED": bool(packed), "MERGED_EDGES": bool(merged)}
if not packed:
    consts.update(KCD=None, VCD=None)
fn = tsp._sparse_attn_fwd
sig = {p.name: "constexpr" if p.is_constexpr else types.get(p.name, "i32") for p in fn.params}
kernel = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts),
                        target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
path = os.path.join(sys.argv[2], "k.ptx")
with open(path, "w") as f:
    f.write(kernel.asm["ptx"])
r = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", path + ".cubin"], capture_output=True, text=True)
print(json.dumps({"rc": r.returncode, "log": r.stderr}))
"""


@pytest.mark.parametrize(
    "config",
    [
        (128, 128, 128, 8, 3, True, 0),  # head_dim 128: the autotuner's pick on an H100, packed columns
        (128, 128, 128, 8, 3, False, 0),  # gathered columns
        (128, 128, 128, 8, 3, True, 1),  # both band edges in one loop (short bands)
        (64, 128, 128, 8, 3, True, 0),  # head_dim 64 (the default model)
        (64, 64, 64, 4, 3, True, 0),  # head_dim 64, 64-row programs
    ],
    ids=["hd128-packed", "hd128-gathered", "hd128-merged-edges", "hd64-packed", "hd64-block64"],
)
def test_sparse_kernel_mmas_not_serialised(config, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(config), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["rc"] == 0, result["log"][-2000:]
    assert "C7515" not in result["log"] and "serialized" not in result["log"], result["log"]
