"""The benchmark tables and plots render every row, with and without optional fields."""

from __future__ import annotations

from pathlib import Path

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
