"""loadtest/sim_vs_server.py on a committed e2e run: the simulator is given the server's measured
compute per run (`--exec account`, from the placer's run account e2e recorded) and reports, beside
the server's, the same accounts: copies per model and the device's time per answered request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import sim_vs_server

RUN = Path(__file__).resolve().parents[2] / "loadtest/measured/under-load-cpu-2026-12-05e/account-over-seed14b.json"


@pytest.mark.skipif(not RUN.exists(), reason="the committed run is not there")
def test_the_simulator_runs_on_the_servers_measured_compute(tmp_path, capsys):
    out = tmp_path / "cmp.json"
    assert sim_vs_server.main([str(RUN), "--seeds", "1", "--exec", "account", "--json", str(out)]) == 0
    e2e = json.loads(RUN.read_text())
    run = e2e["runs"]["torpor"]["workloads"]["zipf"]
    acc = run["run_account_by_model"]
    (cmp,) = json.loads(out.read_text())["compared"]
    torpor = cmp["runs"]["torpor/zipf@1.5"]
    # the execution time it ran with is the measured compute per run of each class
    for k, ms in torpor["exec_ms"].items():
        models = [a for n, a in acc.items() if n.startswith(k + "_")]
        assert ms == pytest.approx(sum(a["compute_s"] for a in models) / sum(a["runs"] for a in models) * 1e3)
    pred = torpor["predicted"]["all"]
    # its own account adds up: computing and copy waits are the device's busy time
    assert pred["compute_s"] + pred["copy_wait_s"] == pytest.approx(pred["busy_s"], rel=0.02)
    assert sum(pred["swap_ins_by_fn"].values()) == pred["swap_ins"]
    printed = capsys.readouterr().out
    assert "copies per model, simulated | server:" in printed
    assert "device ms per answer, simulated | server:" in printed
