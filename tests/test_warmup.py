"""The sparse kernels readied while the model loads (models/warmup.py)."""

from __future__ import annotations

import dataclasses
import functools
import types

import pytest
import torch

from sacli.config import Settings
from sacli.models import warmup

CUDA = torch.device("cuda")
CONFIG = types.SimpleNamespace(num_attention_heads=9, num_key_value_heads=3, hidden_size=576)


def test_head_shape_from_config() -> None:
    assert warmup.head_shape(CONFIG) == (9, 3, 64)
    assert warmup.head_shape(types.SimpleNamespace(num_attention_heads=32, num_key_value_heads=None,
                                                   hidden_size=4096, head_dim=128)) == (32, 32, 128)


@pytest.mark.parametrize(
    "change, device, tokens",
    [
        ({}, torch.device("cpu"), 32768),  # the CPU runs the PyTorch reference
        ({"dense": True}, CUDA, 32768),
        ({"rule": "segments"}, CUDA, 32768),  # stage 1 in PyTorch
        ({}, CUDA, 16383),  # routed to dense by the measured crossover
        ({"dense_below": 40000}, CUDA, 32768),
    ],
)
def test_nothing_to_warm(change: dict, device: torch.device, tokens: int) -> None:
    settings = dataclasses.replace(Settings(), **change)
    assert warmup.start(settings, CONFIG, device, torch.bfloat16, tokens) is None


def test_turned_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(warmup.ENV_VAR, "0")
    assert warmup.start(Settings(), CONFIG, CUDA, torch.bfloat16, 32768) is None


def test_wait_joins_and_keeps_errors() -> None:
    ran = []
    ok = warmup.Warmup(lambda: ran.append(1))
    ok.wait()
    assert ran == [1] and ok.error is None

    def fail() -> None:
        raise RuntimeError("no GPU today")

    bad = warmup.Warmup(fail)
    bad.wait()
    assert isinstance(bad.error, RuntimeError)


def test_generate_waits_for_the_warmup(tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from sacli.models import generate as gen
    from sacli.models.loading import load_model

    lm = load_model(tiny_model, Settings(device="cpu", max_new_tokens=2), 64)
    assert lm.warmup is None  # no prompt length given, and a CPU
    events: list[str] = []

    class Probe:
        def wait(self) -> None:
            events.append("wait")

    real = lm.model.forward

    @functools.wraps(real)  # keeps the signature generate reads the cache's name from
    def forward(*args, **kwargs):  # type: ignore[no-untyped-def]
        events.append("forward")
        return real(*args, **kwargs)

    monkeypatch.setattr(lm.model, "forward", forward)
    lm = dataclasses.replace(lm, warmup=Probe())
    gen.generate(lm, torch.tensor([[1, 2, 3, 4]]), Settings(device="cpu", max_new_tokens=2))
    assert events[:2] == ["wait", "forward"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_prefill_after_a_warmup_autotunes_nothing() -> None:
    from sacli.kernels import sample_attention
    from sacli.kernels.triton_sparse import _sparse_attn_fwd_tuned

    settings = dataclasses.replace(Settings(), dense_below=0)
    w = warmup.start(settings, CONFIG, CUDA, torch.bfloat16, 4096)
    assert w is not None
    w.wait()
    assert w.error is None
    tuned = dict(_sparse_attn_fwd_tuned.cache)
    q = torch.randn(1, 4096, 9, 64, device=CUDA, dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(1, 3, 4096, 64, device=CUDA, dtype=torch.bfloat16) for _ in range(2))
    sample_attention(q, k, v, alpha=0.95, window=0.05, sample_ratio=0.05, dense_below=0, graphs=False)
    assert dict(_sparse_attn_fwd_tuned.cache) == tuned


@pytest.mark.parametrize(
    "change, text_bytes, started",
    [
        ({}, 20000, True),  # may reach the 16K crossover
        ({}, 10000, False),  # cannot: fewer bytes than tokens needed
        ({"dense_below": 0}, 100, True),
        ({"dense": True}, 20000, False),
        ({"device": "cpu"}, 20000, False),
    ],
)
def test_triton_setup_starts_only_for_long_enough_text(
    change: dict, text_bytes: int, started: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(warmup, "_prepared", None)
    monkeypatch.setattr(warmup, "_prepare", lambda: ran.append(1))
    monkeypatch.setattr("sacli.kernels.backend.triton_available", lambda: True)
    warmup.prepare(dataclasses.replace(Settings(), **change), text_bytes)
    if warmup._prepared is not None:
        warmup._prepared.wait()
    assert ran == ([1] if started else [])
