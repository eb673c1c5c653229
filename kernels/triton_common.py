"""Helpers shared by the Triton launchers: interpreter detection, dtype and layout checks.

Imported only by the Triton kernel modules (which the backend imports lazily), so `triton`
is required here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Head sizes the kernels are built and tested for (tl.arange needs a power of two).
HEAD_DIMS = (64, 128)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


def interpreter_compat() -> None:
    """Let Triton 3.6's CPU interpreter run loops with tensor bounds under numpy >= 2.4.

    The interpreter turns a scalar into a loop bound with int() of a 1-element array, which
    numpy 2.4 rejects (triton-lang/triton#9171, fixed upstream after 3.6). Called by the
    launchers only while interpreting; idempotent; the compiled GPU path is untouched.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_sacli_compat", False):
        return

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._sacli_compat = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


@triton.jit
def dot_nt(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """a [M, D] @ b [N, D]^T in float32 (operands upcast first under the interpreter, see dot_flags)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision=PREC)
    return tl.dot(a, tl.trans(b), input_precision=PREC)


@triton.jit
def row_tile(base, desc, b, h, start, offs_n, offs_d, S, s_row, EDGE: tl.constexpr, TMA: tl.constexpr):
    """Rows [start, start + len(offs_n)) of one head's (S, D) matrix, as a [len(offs_n), D] tile:
    through the host-made (B, H, S, D) descriptor `desc` where TMA (the copy engine zero-fills rows
    past S itself), else ordinary loads from `base` with row stride s_row, rows >= S read as
    zeros where EDGE."""
    if TMA:
        return desc.load([b, h, start, 0]).reshape(offs_n.shape[0], offs_d.shape[0])
    offs_j = start + offs_n
    if EDGE:
        return tl.load(base + offs_j[:, None] * s_row + offs_d[None, :], mask=(offs_j < S)[:, None], other=0.0)
    return tl.load(base + offs_j[:, None] * s_row + offs_d[None, :])


def dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, DOT_PRECISION) constexprs for a kernel reading `dtype` operands.

    UPCAST: the interpreter multiplies bf16 tiles as raw uint16 words, so there the kernels
    convert operands to float32 before tl.dot; products of bf16/fp16 values are exact in float32,
    so this changes only the summation order, not the math the GPU does.
    DOT_PRECISION: float32 inputs use full-precision products ("ieee") rather than TF32.
    """
    upcast = interpreting() and dtype != torch.float32
    precision = "ieee" if dtype == torch.float32 or upcast else "tf32"
    return upcast, precision


def check_device(*tensors: torch.Tensor) -> None:
    """Tensors must live on CUDA, or on the CPU while the interpreter runs."""
    for t in tensors:
        assert t.is_cuda or (interpreting() and t.device.type == "cpu"), (
            f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 with CPU tensors), got {t.device}"
        )


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> tuple[int, int, int, int, int]:
    """Validate q (B, Hq, S, D), k/v (B, Hkv, S, D); returns (B, Hq, Hkv, S, D)."""
    assert q.dim() == 4 and k.dim() == 4, f"q, k must be 4-D, got {tuple(q.shape)} and {tuple(k.shape)}"
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    assert k.shape[0] == B and k.shape[2] == S and k.shape[3] == D, (
        f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in B, S or D"
    )
    assert Hkv >= 1 and Hq % Hkv == 0, f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})"
    assert D in HEAD_DIMS, f"head_dim must be one of {HEAD_DIMS}, got {D}"
    assert q.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {q.dtype}"
    assert k.dtype == q.dtype, f"q and k dtypes differ: {q.dtype} vs {k.dtype}"
    assert S >= 1 and B >= 1, f"empty input: B={B}, S={S}"
    if v is not None:
        assert v.shape == k.shape, f"v {tuple(v.shape)} must equal k {tuple(k.shape)}"
        assert v.dtype == q.dtype, f"q and v dtypes differ: {q.dtype} vs {v.dtype}"
        check_device(q, k, v)
    else:
        check_device(q, k)
    return B, Hq, Hkv, S, D


def tma_compatible(*tensors: torch.Tensor) -> bool:
    """Whether the copy engine (TMA) can read/write these tensors' rows: a Hopper-class GPU (or
    the interpreter), 16-byte aligned base addresses and row strides.

    On a GPU only for 16-bit dtypes: bf16 and fp16 are checked and timed on an H100; float32
    through descriptors was never checked there (its head_dim-128 kernel takes minutes to
    compile), so float32 keeps ordinary loads (the interpreter still exercises every dtype)."""
    if not interpreting():
        if not all(t.is_cuda for t in tensors) or torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
            return False
        if any(t.element_size() != 2 for t in tensors):
            return False
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any((st * size) % 16 for st in t.stride()[:-1]):
            return False
    return True


# Shortest sequence the GPU launchers read through descriptors: one tile's rows, the regime
# checked on an H100 (a box longer than the whole sequence was not); shorter inputs lose nothing.
TMA_MIN_ROWS = 128


def use_descriptors(requested: bool, seq_len: int, *tensors: torch.Tensor) -> bool:
    """The launchers' decision: descriptors if requested, `tma_compatible`, and (on the GPU) the
    sequence is at least TMA_MIN_ROWS long."""
    return bool(requested) and tma_compatible(*tensors) and (interpreting() or seq_len >= TMA_MIN_ROWS)


def descriptor_rows_hook(**rows_of: str):  # type: ignore[no-untyped-def]
    """Autotune pre-hook: each host-made (B, H, S, D) descriptor named in `rows_of` (when passed)
    loads tiles of as many rows as the launched config's meta-parameter rows_of[name]
    (e.g. KD="BLOCK_N")."""

    def hook(nargs: dict) -> None:
        for name, rows in rows_of.items():
            if nargs.get(name) is not None:
                nargs[name].block_shape = [1, 1, nargs[rows], nargs["HEAD_DIM"]]

    return hook


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels index rows by strides but read each row as one contiguous vector."""
    return t if t.stride(-1) == 1 else t.contiguous()
