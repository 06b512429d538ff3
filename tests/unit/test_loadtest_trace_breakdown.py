"""loadtest/trace_breakdown.py: a Triton trace file with Torpor's stamps, read back per model
class and copy/hit into intervals and the scheduler's prediction error."""

from __future__ import annotations

import json

import pytest

from loadtest.trace_breakdown import breakdown, main, read

MS = 1_000_000


def _trace(i: int, model: str, copy: bool, predicted_ms: float) -> list[dict]:
    stamps = {"REQUEST_START": 0, "TORPOR_STAGE_START": 1, "TORPOR_STAGE_END": 11, "TORPOR_MEMORY_END": 12,
              "TORPOR_EXEC_START": 14, "COMPUTE_END": 20, "TORPOR_PREDICTED_END": predicted_ms}
    if copy:
        stamps |= {"TORPOR_COPY_START": 11, "TORPOR_COPY_END": 18}
    return [{"id": i, "model_name": model, "model_version": 1},
            *({"id": i, "timestamps": [{"name": n, "ns": int(v * MS)}]} for n, v in stamps.items())]


def test_breakdown_per_class_and_copy(tmp_path):
    recs = [*_trace(1, "mlp_small_000", False, 20), *_trace(2, "mlp_small_002", False, 20),
            *_trace(3, "mlp_large_001", True, 12),
            # a request refused before it ran writes no such stamps: not counted
            {"id": 4, "model_name": "mlp_small_000", "model_version": 1},
            {"id": 4, "timestamps": [{"name": "REQUEST_START", "ns": 0}]}]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(recs))
    out = breakdown(read(path))
    assert set(out) == {"mlp_small hit", "mlp_large copy"}
    assert out["mlp_small hit"]["requests"] == 2
    large = out["mlp_large copy"]
    assert large["stage wait"]["p50_ms"] == pytest.approx(10.0)
    assert large["worker queue"]["p50_ms"] == pytest.approx(2.0) and large["run"]["p50_ms"] == pytest.approx(6.0)
    assert large["actual_minus_predicted"]["p50_ms"] == pytest.approx(8.0)  # done at 20 ms, expected at 12
    assert main([str(path), "--json", str(tmp_path / "out.json")]) == 0
    assert json.loads((tmp_path / "out.json").read_text()) == out


def test_a_trace_without_torpors_stamps_says_so(tmp_path, capsys):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps([{"id": 1, "model_name": "simple", "model_version": 1}]))
    assert main([str(path)]) == 1
    assert "no answered request with Torpor's stamps" in capsys.readouterr().err
