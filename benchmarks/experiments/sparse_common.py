"""Shared pieces of the sparse-kernel experiments in this folder: a variant of
kernels/triton_sparse.py built from an edit of its source, random inputs, a CPU check of a
variant against the float64 reference, and one interleaved comparison of launch variants."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from types import ModuleType
from typing import Any, Callable

import torch

from sacli.kernels import triton_sparse as tsp

_HERE = os.path.dirname(os.path.abspath(__file__))


def kernel_variant(name: str, edit: Callable[[str], str]) -> ModuleType:
    """kernels/triton_sparse.py with `edit` applied to its source, imported as module `name`."""
    src = edit(open(tsp.__file__).read())
    src = src.replace("from .selection import", "from sacli.kernels.selection import")
    src = src.replace("from .triton_common import", "from sacli.kernels.triton_common import")
    path = os.path.join(tempfile.mkdtemp(), f"{name}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bf16_qkv(Hq: int, Hkv: int, S: int, D: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (1, H, S, D) bf16 q, k, v on the GPU, drawn in that order from one seeded generator."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, Hq, S, D, device="cuda", generator=gen).to(torch.bfloat16)
    k = torch.randn(1, Hkv, S, D, device="cuda", generator=gen).to(torch.bfloat16)
    v = torch.randn(1, Hkv, S, D, device="cuda", generator=gen).to(torch.bfloat16)
    return q, k, v


def check_against_reference(module: ModuleType) -> None:
    """CPU (TRITON_INTERPRET=1): the variant's launcher on the test suite's sparse cases, within
    twice PyTorch's own error of the float64 masked attention."""
    sys.path.insert(0, os.path.join(_HERE, "..", "..", "tests"))
    import test_triton_kernels as t  # noqa: E402

    for B, Hq, Hkv, S, D, dtype in t.SPARSE_CASES:
        q, k, v = t._qkv(B, Hq, Hkv, S, D, dtype, seed=S + D)
        sel = t._random_selection(B, Hq, S, seed=S)
        out = module.sparse_attention_triton(q, k, v, sel, D**-0.5, out=t._poisoned((B, Hq, S, D), dtype))
        t._assert_within_torch_error(out, q, k, v, t.selection_mask(sel), D**-0.5)
        print("ok", (B, Hq, Hkv, S, D, dtype))


def compare(fns: list[Callable[[], torch.Tensor]], names: tuple[str, ...], *, case: str, shape: tuple[int, int, int],
            S: int, sel: Any, **fields: Any) -> dict[str, Any]:
    """Times `fns` (one sparse launch each, same inputs) in alternating rounds; the entry gives
    each one's median ms and TFLOP/s on the kept entries, and its output's largest difference
    from the first's. Printed as one JSON line and returned."""
    sys.path.insert(0, os.path.join(_HERE, ".."))
    import gpu_check as g  # noqa: E402

    Hq, _, D = shape
    kept = float(sel.kept_entries().sum())
    ref = fns[0]().float()
    diffs = [(f().float() - ref).abs().max().item() for f in fns]
    ms = g.time_interleaved(fns)
    entry = {"case": case, "shape": shape, "S": S, "density": kept / (Hq * S * (S + 1) / 2), **fields,
             "ms": dict(zip(names, ms)), "max_abs_diff": diffs, "tflops": [4 * D * kept / t / 1e9 for t in ms]}
    print(json.dumps(entry), flush=True)
    return entry
