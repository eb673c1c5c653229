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


# gpu_check's float64 cases of the sparse kernel (B, Hq, Hkv, S, D) that a variant must pass on the GPU
GPU_CHECK_CASES = [(1, 4, 2, 1000, 128), (2, 8, 2, 4096, 64), (1, 8, 2, 8192, 128)]


def check_variant_on_gpu(module: ModuleType, launches: list[tuple[dict[str, Any], bool | None]]) -> list[dict[str, Any]]:
    """gpu_check's float64 check (`check_sparse`) run on `module`, a kernel_variant: one entry per
    case of GPU_CHECK_CASES and (config, packed) of `launches`, each printed as a JSON line."""
    sys.path.insert(0, os.path.join(_HERE, ".."))
    import gpu_check as g

    saved = g.tsp
    g.tsp = module
    try:
        checks = []
        for case in GPU_CHECK_CASES:
            for config, packed in launches:
                checks.append(g.check_sparse(case, config, packed=packed))
                print(json.dumps(checks[-1]), flush=True)
    finally:
        g.tsp = saved
    return checks


def time_on_synthetic(plan: list[tuple[int, tuple[float, ...]]], names: tuple[str, ...],
                      make: Callable[..., tuple[list[Callable[[], torch.Tensor]], dict[str, Any]]]) -> list[dict[str, Any]]:
    """For each (S, densities) of `plan`: the 8B-class shape's random bf16 Q/K/V (32 query heads,
    8 KV heads, head_dim 128) and a synthetic selection per density; make(q, k, v, sel, counts, S)
    returns the launches to `compare` and extra fields for its entry."""
    from sacli.bench import synthetic_selection

    runs = []
    for S, densities in plan:
        q, k, v = bf16_qkv(32, 8, S, 128, seed=S)
        for dens in densities:
            sel = synthetic_selection(1, 32, S, density=dens, device="cuda", seed=S)
            counts = tsp.column_counts(sel, tsp.count_block())
            fns, fields = make(q, k, v, sel, counts, S)
            runs.append(compare(fns, names, case="8B", shape=(32, 8, 128), S=S, sel=sel, **fields))
        del q, k, v
        torch.cuda.empty_cache()
    return runs
