"""The server's log, read as a Triton user reads tritonserver's: a line per model loaded, unloaded
or failed (each once), progress through a long start, the model table, Triton's line shapes
(`--log-format`), `--log-file`, `--log-verbose` and the severity switches, and the logging
extension changing a running server's log."""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.request

import pytest

from torpor.logs import TritonFormatter, model_table

from ..conftest import Server
from ..fault_models import write_fault_models

DEFAULT_LINE = re.compile(r'^[IWE]\d{4} \d\d:\d\d:\d\d\.\d{6} \d+ [\w.]+:\d+\] (".*"|)$')
ISO_LINE = re.compile(r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ [IWE] \d+ [\w.]+:\d+\] (".*"|)$')


def records(text: str) -> list[str]:
    """The log's records (tables and the models' own prints left out)."""
    return [ln for ln in text.splitlines() if DEFAULT_LINE.match(ln) or ISO_LINE.match(ln)]


def message(line: str) -> str:
    return json.loads(line.split("] ", 1)[1])


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def post(url: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body or {}).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture
def three_models(tmp_path):
    """Two models that load and one whose initialize raises."""
    repo = write_fault_models(tmp_path / "repo", ["good", "fails_load"])
    write_fault_models(repo, ["raises"])  # loads fine; fails only when asked to run
    return repo


def test_a_start_logs_each_model_once_then_the_table(three_models, tmp_path):
    s = Server(three_models, "--exit-on-error", "false").start(tmp_path)
    try:
        wait_for(lambda: "| Model " in s.log())
    finally:
        s.stop()
    log = s.log()
    lines = records(log)
    assert lines and all(DEFAULT_LINE.match(ln) for ln in lines), lines
    texts = [message(ln) for ln in lines if ln.endswith('"')]
    # progress through the start, in order, each model once
    assert [t for t in texts if t.startswith("loading")] == ["loading 1/3: fails_load", "loading 2/3: good",
                                                            "loading 3/3: raises"]
    for name in ("good", "raises"):
        assert sum(t.startswith(f"successfully loaded '{name}' version 1 (") for t in texts) == 1
        assert texts.count(f"successfully unloaded '{name}' version 1") == 1  # at shutdown
    # the failure: once, at error severity, without a wrapper's class name or repeated text
    failed = [ln for ln in lines if "fails_load" in ln and "failed" in ln]
    assert len(failed) == 1 and failed[0].startswith("E"), failed
    assert message(failed[0]) == "failed to load 'fails_load' version 1: RuntimeError: this model cannot load"
    # then Triton's table, after the last load and before serving
    table = log[log.index("+---"):].split("\n\n")[0]
    assert table == model_table([("fails_load", "1", "UNAVAILABLE: RuntimeError: this model cannot load"),
                                 ("good", "1", "READY"), ("raises", "1", "READY")])
    assert log.index("loading 3/3") < log.index("| Model ") < log.index('"serving HTTP on')


def test_explicit_loads_and_unloads_are_logged(tmp_path):
    repo = write_fault_models(tmp_path / "repo", ["good", "fails_load"])
    s = Server(repo, "--model-control-mode", "explicit").start(tmp_path)
    base = f"http://{s.http_url}/v2/repository/models"
    try:
        assert post(f"{base}/good/load")[0] == 200
        assert post(f"{base}/good/unload")[0] == 200
        code, body = post(f"{base}/fails_load/load")
        assert code != 200 and "this model cannot load" in body["error"]
        wait_for(lambda: "failed to load 'fails_load'" in s.log())
    finally:
        s.stop()
    texts = [message(ln) for ln in records(s.log()) if ln.endswith('"')]
    assert texts.count("loading: good") == 1 and texts.count("loading: fails_load") == 1
    assert sum(t.startswith("successfully loaded 'good' version 1 (") for t in texts) == 1
    # unloaded once by the API; the server's own shutdown has nothing left to unload
    assert texts.count("successfully unloaded 'good' version 1") == 1
    assert [t for t in texts if "fails_load" in t and "failed" in t] == [
        "failed to load 'fails_load' version 1: RuntimeError: this model cannot load"]
    table = s.log()[s.log().index("+---"):].split("\n\n")[0]
    assert table == model_table([])  # explicit mode, nothing asked for at start: Triton's empty table


def test_iso8601_to_a_log_file_and_verbose(tmp_path):
    log_file = tmp_path / "torpor.log"
    repo = write_fault_models(tmp_path / "repo", ["good"])
    s = Server(repo, "--log-format", "ISO8601", "--log-file", str(log_file), "--log-verbose", "1").start(tmp_path)
    try:
        wait_for(lambda: log_file.exists() and "serving HTTP" in log_file.read_text())
        with urllib.request.urlopen(f"http://{s.http_url}/v2/logging", timeout=10) as r:
            assert json.loads(r.read())["log_file"] == str(log_file)
    finally:
        s.stop()
    text = log_file.read_text()
    lines = records(text)
    assert lines and all(ISO_LINE.match(ln) for ln in lines), lines
    assert any(message(ln) == "loading 1/1: good" for ln in lines)
    # verbose: the configuration each model was loaded with, as tritonserver's verbose log shows
    (verbose,) = [message(ln) for ln in lines if "loaded with config" in ln]
    assert json.loads(verbose.split("config ", 1)[1])["name"] == "good"
    assert "| good  | 1       | READY  |" in text
    assert not records(s.log())  # nothing went to stderr


def test_severity_switches_and_the_logging_extension(tmp_path):
    repo = write_fault_models(tmp_path / "repo", ["good", "fails_load"])
    s = Server(repo, "--exit-on-error", "false", "--log-info", "false").start(tmp_path)
    url = f"http://{s.http_url}/v2/logging"
    try:
        wait_for(lambda: "fails_load" in s.log())
        time.sleep(0.5)
        assert [ln[0] for ln in records(s.log())] == ["E"]  # info off: only the failure
        # the logging extension turns info on and switches the shape of the lines from now on
        assert post(url, {"log_info": True, "log_format": "ISO8601"})[0] == 200
    finally:
        s.stop()  # the shutdown unloads 'good': an info line, now in the ISO8601 shape
    after = [message(ln) for ln in records(s.log()) if ISO_LINE.match(ln)]
    assert after == ["successfully unloaded 'good' version 1"]


def test_the_model_table_has_tritons_shape():
    """As tritonserver 2.51 prints it (seen on the real binary): a multi-line status continues on
    rows whose other cells are blank."""
    assert model_table([("add_sub", "1", "READY"), ("bad", "1", "UNAVAILABLE: boom\n\nAt:\n  model.py(3)")]) == (
        "+---------+---------+-------------------+\n"
        "| Model   | Version | Status            |\n"
        "+---------+---------+-------------------+\n"
        "| add_sub | 1       | READY             |\n"
        "| bad     | 1       | UNAVAILABLE: boom |\n"
        "|         |         |                   |\n"
        "|         |         | At:               |\n"
        "|         |         |   model.py(3)     |\n"
        "+---------+---------+-------------------+")
    assert model_table([]) == ("+-------+---------+--------+\n| Model | Version | Status |\n"
                               "+-------+---------+--------+\n+-------+---------+--------+")


def test_a_record_is_one_line_in_either_shape():
    settings = {"log_format": "default"}
    fmt = TritonFormatter(lambda: settings)
    record = logging.LogRecord("torpor", logging.WARNING, "/x/lifecycle.py", 42, "two\nlines %s", ("here",), None)
    record.created = 1764900000.25  # 2025-12-05 02:00:00.25 UTC
    assert fmt.format(record) == f'W1205 02:00:00.250000 {record.process} lifecycle.py:42] "two\\nlines here"'
    settings["log_format"] = "ISO8601"
    assert fmt.format(record) == f'2025-12-05T02:00:00Z W {record.process} lifecycle.py:42] "two\\nlines here"'

