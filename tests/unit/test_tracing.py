"""torpor.tracing without a server: tritonserver's tracing flags, the settings' rules, sampling."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from torpor import tracing
from torpor.errors import Status, TorporError
from torpor.tracing import TraceConfig, Tracer, add_trace_arguments, trace_config
from torpor.tracing_otel import MISSING_SDK, otlp_url


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torpor serve")
    add_trace_arguments(p)
    return p.parse_args(list(argv))


def test_trace_config_flags_make_the_config(tmp_path):
    f = tmp_path / "t.json"
    args = parse("--trace-config", f"triton,file={f}", "--trace-config", "triton,log-frequency=50",
                 "--trace-config", "rate=100", "--trace-config", "level=timestamps", "--trace-config", "count=10")
    c = trace_config(args)
    assert (c.mode, c.file, c.log_frequency, c.rate, c.level, c.count) == ("triton", str(f), 50, 100, ["TIMESTAMPS"], 10)
    assert trace_config(parse()) == TraceConfig()


def test_opentelemetry_settings(monkeypatch):
    monkeypatch.setattr(tracing, "sdk_missing", lambda: False)
    c = trace_config(parse("--trace-config", "mode=opentelemetry", "--trace-config", "opentelemetry,url=collector:4318",
                           "--trace-config", "opentelemetry,resource=service.name=torpor",
                           "--trace-config", "opentelemetry,resource=team=ml",
                           "--trace-config", "opentelemetry,bsp_schedule_delay=200", "--trace-config", "rate=0"))
    assert c.mode == "opentelemetry" and c.rate == 0 and c.bsp == {"bsp_schedule_delay": 200}
    assert c.resource == {"service.name": "torpor", "team": "ml"}
    assert otlp_url(c.url) == "http://collector:4318/v1/traces"
    assert otlp_url("https://c:1/x") == "https://c:1/x"


def test_every_flag_says_its_default():
    p = argparse.ArgumentParser()
    add_trace_arguments(p)
    flags = [a for a in p._actions if a.option_strings and a.dest != "help"]
    assert {a.option_strings[0] for a in flags} == {"--trace-config", "--trace-file", "--trace-level", "--trace-rate",
                                                     "--trace-count", "--trace-log-frequency"}
    assert all(re.search(r"\(default: [^)]+\)", a.help % {"default": a.default}) for a in flags)


def test_deprecated_flags_and_trace_config_over_them(tmp_path):
    f = tmp_path / "t.json"
    args = parse("--trace-file", str(f), "--trace-level", "TIMESTAMPS", "--trace-level", "TENSORS",
                 "--trace-rate", "5", "--trace-count", "3", "--trace-log-frequency", "2", "--trace-config", "rate=7")
    c = trace_config(args)
    assert (c.file, c.level, c.rate, c.count, c.log_frequency) == (str(f), ["TIMESTAMPS", "TENSORS"], 7, 3, 2)


@pytest.mark.parametrize("value, text", [
    ("rate=abc", "rate=abc: expected an integer >= 0"),
    ("count=-2", "count=-2: expected an integer >= -1"),
    ("level=LOUD", "invalid trace level 'LOUD'"),
    ("mode=jaeger", "invalid trace mode 'jaeger'"),
    ("file=/tmp/t.json", "'file' is not a global trace setting"),
    ("triton,url=x", "'url' is not trace mode 'triton'"),
    ("zipkin,url=x", "unknown trace mode 'zipkin'"),
    ("triton,file", "format is '[<trace mode>,]<setting>=<value>'"),
    ("triton,file=/no/such/folder/t.json", "no such directory /no/such/folder"),
    ("opentelemetry,resource=novalue", "expected KEY=VALUE"),
    ("opentelemetry,bsp_max_queue_size=0", "expected an integer >= 1"),
])
def test_a_wrong_value_stops_at_parse_time_in_one_line(capsys, value, text):
    with pytest.raises(SystemExit) as e:
        parse("--trace-config", value)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("torpor serve: error: argument --trace-config: ") and text in err


def test_opentelemetry_without_the_sdk_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(tracing, "sdk_missing", lambda: True)
    with pytest.raises(SystemExit):
        parse("--trace-config", "mode=opentelemetry")
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(MISSING_SDK)
    assert "pip install opentelemetry-sdk" in MISSING_SDK


def test_opentelemetry_without_the_sdk_at_run_time(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(RuntimeError, match="needs the OpenTelemetry SDK"):
        Tracer().configure(TraceConfig(mode="opentelemetry", level=["TIMESTAMPS"]))


def test_settings_update_is_all_or_nothing_and_null_restores(tmp_path):
    t = Tracer()
    t.configure(TraceConfig(file=str(tmp_path / "t.json"), rate=10))
    with pytest.raises(TorporError) as e:
        t.settings("", {"trace_rate": "3", "trace_count": "-9"})
    assert e.value.status == Status.INVALID_ARG and t.settings()["trace_rate"] == "10"
    assert t.settings("", {"trace_rate": "3"})["trace_rate"] == "3"
    assert t.settings("", {"trace_rate": None})["trace_rate"] == "10"  # Triton: back to the start-up value
    assert t.settings("m", {"trace_rate": "2"})["trace_rate"] == "2"
    assert t.settings("m", {"trace_rate": None})["trace_rate"] == "10"  # the model follows the global again
    with pytest.raises(TorporError) as e:
        t.settings("", {"trace_mode": "opentelemetry"})
    assert e.value.status == Status.UNSUPPORTED


def test_sampling_is_off_until_a_level_and_a_destination(tmp_path):
    t = Tracer()
    assert not t.on and t.sample("m", "HTTP") is None
    t.configure(TraceConfig(level=["TIMESTAMPS"], rate=1))  # no file: nowhere to write
    assert not t.on
    t.configure(TraceConfig(level=["TIMESTAMPS"], rate=3, file=str(tmp_path / "t.json")))
    sampled = [t.sample("m", "GRPC") for _ in range(7)]
    assert [s is not None for s in sampled] == [False, False, True, False, False, True, False]
    trace = sampled[2]
    assert trace.id == 1 and [n for n, _ in trace.stamps] == ["GRPC_WAITREAD_START", "GRPC_WAITREAD_END"]
    t.settings("", {"trace_level": ["OFF"]})
    assert not t.on


def test_an_unanswered_request_is_not_written(tmp_path):
    path = tmp_path / "t.json"
    t = Tracer()
    t.configure(TraceConfig(level=["TIMESTAMPS"], rate=1, file=str(path)))
    refused, answered = t.sample("m", "HTTP"), t.sample("m", "HTTP")
    refused.end("HTTP_SEND_END")
    answered.request_done("m", 3, "", 10, 11, 12, 13, 14, 15)
    answered.end("HTTP_SEND_END")
    answered.end("HTTP_SEND_END")  # once only
    t.close()
    objects = json.loads(path.read_text())
    assert objects[0] == {"id": 2, "model_name": "m", "model_version": 3}  # no request_id when the request had none
    assert {o["id"] for o in objects} == {2}
    assert sum(o.get("timestamps", [{}])[0].get("name") == "HTTP_SEND_END" for o in objects) == 1
