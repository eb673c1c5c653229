"""The benchmark tables and plots render every row, with and without optional fields."""

from __future__ import annotations

from pathlib import Path

import torch

from sacli.bench import plot_attention, render_attention


def _model_payload(with_e2e: bool) -> dict:
    layers = []
    for layer, density in ((0, 0.7), (6, 0.21)):
        row = {
            "layer": layer, "density": density, "sampling_ms": 0.41, "selection_ms": 0.52,
            "sparse_kernel_ms": 0.33, "total_ms": 1.26, "speedup_total_vs_sdpa_cudnn": 0.57,
            "dense": {"sdpa_flash": {"ms": 1.19}, "sdpa_cudnn": {"ms": 0.72}},
        }
        if with_e2e:
            row.update(end_to_end_ms=0.61, speedup_end_to_end_vs_sdpa_cudnn=1.18)
        layers.append(row)
    return {"workload": "model", "env": {"device": "test"}, "results": [{"seq_len": 16384, "layers": layers}]}


def test_model_table_shows_end_to_end_when_measured() -> None:
    text = render_attention(_model_payload(True))
    rows = [line for line in text.splitlines() if line.strip().startswith("16384")]
    assert len(rows) == 2, text
    assert rows[1].split()[-2:] == ["0.61", "1.18"], rows[1]


def test_model_table_and_plot_without_end_to_end(tmp_path: Path) -> None:
    payload = _model_payload(False)
    rows = [line for line in render_attention(payload).splitlines() if line.strip().startswith("16384")]
    assert len(rows) == 2 and all(r.split()[-2:] == ["-", "-"] for r in rows), rows
    out = tmp_path / "p.png"
    plot_attention(payload, out)
    assert out.stat().st_size > 1000


def test_synthetic_table_shows_kernel_rate_against_cudnn(monkeypatch) -> None:
    import sacli.kernels.backend as kb
    from sacli.bench import StageTimes, _sparse_row

    class _Sel:  # what _sparse_row reads of a Selection
        window = torch.full((1, 2), 4)
        ncols = torch.tensor([[3, 5]])

        @staticmethod
        def kept_entries() -> torch.Tensor:
            return torch.tensor([[20.0, 16.0]])  # 36 of 2 x 36 causal entries: density 0.5

    calls: list[int] = []
    monkeypatch.setattr(kb, "sparse_attention", lambda *a, **kw: calls.append(1))
    q = torch.zeros(1, 2, 8, 64)
    row = _sparse_row(q, q, q, _Sel(), 0.1, StageTimes(1.0, 0.5), {"sdpa_cudnn": 8.0, "sdpa_flash": None}, "0.5")
    assert calls, "the kernel was not run"
    assert row["density"] == 0.5
    # share of cuDNN's FLOP rate = density x cuDNN time / kernel time
    assert row["kernel_rate_vs_sdpa_cudnn"] == 0.5 * 8.0 / row["sparse_kernel_ms"]
    assert "kernel_rate_vs_sdpa_flash" not in row
    payload = {"workload": "synthetic", "results": [{"seq_len": 8, "dense": {"sdpa_flash": {"ms": None},
               "sdpa_cudnn": {"ms": 8.0}}, "sparse": [{**row, "kernel_rate_vs_sdpa_cudnn": 0.76}]}]}
    line = [x for x in render_attention(payload).splitlines() if x.strip().startswith("8 ")][0]
    assert "76%" in line.split(), line


def test_ttft_runs_alternate_modes_and_take_medians() -> None:
    from sacli.bench import _median_runs

    calls: list[str] = []
    ttft = {"dense": iter([99.0, 10.0, 12.0, 11.0]), "sparse": iter([99.0, 5.0, 50.0, 6.0])}

    def runs(mode: str):
        def ttft_run():
            calls.append(f"t-{mode}")
            return next(ttft[mode]), 1.0, mode

        def attention_run():
            calls.append(f"a-{mode}")
            return [1.0, 2.0] if mode == "dense" else [0.5, 1.0]

        return ttft_run, attention_run

    out = _median_runs({m: runs(m) for m in ("dense", "sparse")}, repeats=3)
    # one warm-up each, then the modes take turns
    assert calls[:8] == ["t-dense", "t-sparse"] * 4
    assert calls[8:] == ["a-dense", "a-sparse"] * 3
    assert out["dense"]["ttft_ms"] == 11.0 and out["dense"]["ttft_ms_runs"] == [10.0, 12.0, 11.0]
    assert out["sparse"]["ttft_ms"] == 6.0  # the outlier run does not move the median
    assert out["sparse"]["attention_ms_per_layer"] == [0.5, 1.0] and out["dense"]["attention_ms_total"] == 3.0
