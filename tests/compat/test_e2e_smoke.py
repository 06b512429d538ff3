"""loadtest/e2e.py end to end: one tiny run on CPU (two servers, native and torpor, WideMLP models,
HTTP and gRPC) that must answer every request. (Its generators and accounting on their own:
tests/unit/test_loadtest_e2e.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loadtest.e2e_workloads import find_trace

from ..unit.test_loadtest_e2e import ROOT, SCRIPT, load_e2e


def test_e2e_tiny_cpu(tmp_path, capsys):
    pytest.importorskip("tritonclient.http.aio")
    pytest.importorskip("tritonclient.grpc.aio")
    out = tmp_path / "e2e.json"
    trace = find_trace(None)  # the paper's trace when it is beside the repo, else Zipf
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--models", "4", "--device", "cpu", "--duration", "3",
           "--protocol", "both", "--workload", "trace" if trace else "zipf",
           "--repo", str(tmp_path / "models"), "--json", str(out), "--budget-s", "120", "--gen-workers", "2"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["ok"] and res["failed_requests"] == 0
    for cfg in ("native", "torpor"):
        run = res["runs"][cfg]
        assert run["server_exit"] == 0
        (wl,) = run["workloads"].values()
        overall = wl["classes"]["all"]
        assert overall["answered"] > 0 and overall["failed"] == 0 and overall["lost"] == 0
        assert overall["goodput_rps"] > 0 and wl["load"] == 0.5
        assert wl["classes"]["all/http"]["answered"] > 0 and wl["classes"]["all/grpc"]["answered"] > 0
    native = next(iter(res["runs"]["native"]["workloads"].values()))["classes"]["all"]
    torpor = next(iter(res["runs"]["torpor"]["workloads"].values()))["classes"]["all"]
    assert native["swap_ins"] == 0  # everything became resident at warm-up
    assert torpor["swap_ins"] > 0 and torpor["bytes_moved"] > 0  # a quarter of the bytes: it must swap
    assert res["ratios"] and all("goodput" in r for rows in res["ratios"].values() for r in rows.values())
    assert res["lost_requests"] == 0 and "shed_requests" in res
    assert load_e2e().main(["--table", str(out)]) == 0  # one row per load x workload, nothing run
    assert " 0.5 " in capsys.readouterr().out
