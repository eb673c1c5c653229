"""The prefill's per-layer timer on CUDA: events instead of a synchronisation per layer.

The GPU path runs here with stand-in events (no GPU needed): it must never wait for the layer it
has just issued, only for the one before, report progress in order, and read the times from the
events once the forward is done.
"""

from __future__ import annotations

import itertools

import torch

from sacli.models import generate as gen


class _FakeEvent:
    clock = itertools.count(1)
    log: list[tuple[str, int]] = []
    created: list["_FakeEvent"] = []

    def __init__(self, enable_timing: bool = False):
        assert enable_timing
        self.t: int | None = None
        _FakeEvent.created.append(self)

    def record(self, stream: object = None) -> None:
        assert stream == "stream of cuda:1"  # the model's device, not the current one
        self.t = next(_FakeEvent.clock) * 10

    def synchronize(self) -> None:
        _FakeEvent.log.append(("wait", _FakeEvent.created.index(self)))

    def elapsed_time(self, end: "_FakeEvent") -> float:
        assert self.t is not None and end.t is not None
        return float(end.t - self.t)


def test_cuda_timer_waits_one_layer_behind_and_reads_events(monkeypatch):
    _FakeEvent.log.clear()
    _FakeEvent.created.clear()
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    syncs: list[str] = []
    monkeypatch.setattr(gen, "_sync", lambda device: syncs.append(str(device)))
    layers = [torch.nn.Identity() for _ in range(3)]
    seen: list[tuple[int, int]] = []
    timer = gen._LayerTimer(layers, torch.device("cuda:1"), lambda d, n: (seen.append((d, n)), _FakeEvent.log.append(("report", d))))
    x = torch.randn(2, 3)
    for layer in layers:
        x = layer(x)
    assert syncs == []  # no synchronisation while the layers are issued
    # events: start0 end0 start1 end1 start2 end2; layer i's end hook waits for layer i-1's end
    assert _FakeEvent.log == [("wait", 1), ("report", 1), ("wait", 3), ("report", 2)]
    timer.finish()
    timer.remove()
    assert syncs == ["cuda:1"]
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert timer.ms == [10.0, 10.0, 10.0]


def test_cpu_timer_reports_each_layer_as_it_ends():
    layers = [torch.nn.Identity() for _ in range(2)]
    seen: list[tuple[int, int]] = []
    timer = gen._LayerTimer(layers, torch.device("cpu"), lambda d, n: seen.append((d, n)))
    x = torch.randn(4)
    for layer in layers:
        x = layer(x)
    assert seen == [(1, 2), (2, 2)]
    timer.finish()
    timer.remove()
    assert seen == [(1, 2), (2, 2)]
    assert all(ms >= 0.0 for ms in timer.ms) and len(timer.ms) == 2
