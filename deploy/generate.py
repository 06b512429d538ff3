"""Writes Torpor's Grafana dashboard and the Prometheus operator form of its alert rules.

    python deploy/generate.py          # rewrite deploy/grafana/torpor-dashboard.json and
                                       # deploy/prometheus/torpor-prometheusrule.yaml
    python deploy/generate.py --check  # exit 1 if either differs from what this script writes

The dashboard is built here panel by panel. The alert rules are written once, by hand, in
deploy/prometheus/torpor-rules.yaml (a plain Prometheus rules file); the PrometheusRule carries
the same groups, indented under its spec, comments and all. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent
DASHBOARD = DEPLOY / "grafana" / "torpor-dashboard.json"
RULES = DEPLOY / "prometheus" / "torpor-rules.yaml"
PROMETHEUS_RULE = DEPLOY / "prometheus" / "torpor-prometheusrule.yaml"

# Selectors that follow the dashboard's instance and model variables.
BY_MODEL = '{instance=~"$instance", model=~"$model"}'
BY_INSTANCE = '{instance=~"$instance"}'
MET = '{outcome="met", instance=~"$instance", model=~"$model"}'
RATE = "[$__rate_interval]"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def rate(metric: str, selector: str = BY_MODEL, by: str = "model") -> str:
    return f"sum by ({by}) (rate({metric}{selector}{RATE}))"


def per_request(metric: str) -> str:
    """A cumulative duration counter over the successful requests in the same window."""
    return f"{rate(metric)} / {rate('nv_inference_request_success')}"


class Layout:
    """Places panels left to right, 24 columns wide, a row header before each group."""

    def __init__(self):
        self.panels: list[dict] = []
        self.x = self.y = 0
        self.height = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "collapsed": False, "panels": [],
                            "id": len(self.panels) + 1, "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1}})
        self.y += 1

    def add(self, panel: dict, w: int = 8, h: int = 8) -> None:
        if self.x + w > 24:
            self._newline()
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.panels.append(panel)
        self.x += w
        self.height = max(self.height, h)

    def _newline(self) -> None:
        self.y += self.height
        self.x = self.height = 0


def panel(title: str, description: str, targets: list[tuple[str, str]], unit: str = "short",
          kind: str = "timeseries", instant: bool = False) -> dict:
    """A panel over (expr, legend) targets, each refId A, B, ..."""
    p = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
             **({"instant": True, "range": False, "format": "table"} if instant else {"range": True})}
            for i, (expr, legend) in enumerate(targets)
        ],
    }
    if kind == "timeseries":
        p["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    return p


def variable(name: str, label: str, query: str) -> dict:
    return {
        "name": name, "label": label, "type": "query", "datasource": DATASOURCE,
        "query": {"query": query, "refId": name}, "definition": query,
        "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*",
        "current": {"text": "All", "value": "$__all"}, "sort": 1,
    }


def request_panels(g: Layout) -> None:
    g.row("Requests (Triton's metrics)")
    g.add(panel("Successful requests", "nv_inference_request_success per second, by model.",
                [(rate("nv_inference_request_success"), "{{model}}")], "reqps"))
    g.add(panel("Failed requests by reason", "nv_inference_request_failure per second. REJECTED includes "
                "requests Torpor shed under overload (UNAVAILABLE).",
                [(rate("nv_inference_request_failure", by="model, reason"), "{{model}} {{reason}}")], "reqps"))
    g.add(panel("Pending requests", "nv_inference_pending_request_count: requests queued or executing.",
                [(f"sum by (model) (nv_inference_pending_request_count{BY_MODEL})", "{{model}}")]))
    g.add(panel("Request latency (mean)", "nv_inference_request_duration_us over successful requests: "
                "arrival to response, queue and swap-in included.",
                [(per_request("nv_inference_request_duration_us"), "{{model}}")], "µs"))
    g.add(panel("Queue time (mean)", "nv_inference_queue_duration_us over successful requests.",
                [(per_request("nv_inference_queue_duration_us"), "{{model}}")], "µs"))
    g.add(panel("Compute time (mean)", "Triton's compute input, infer and output durations over successful "
                "requests.",
                [(per_request(f"nv_inference_compute_{part}_duration_us"), "{{model}} " + part)
                 for part in ("input", "infer", "output")], "µs"))
    g.add(panel("Inferences per execution", "nv_inference_count / nv_inference_exec_count: how much dynamic "
                "batching joins requests.",
                [(f"{rate('nv_inference_count')} / {rate('nv_inference_exec_count')}", "{{model}}")]))
    g.add(panel("Model load time", "nv_model_load_duration_secs of each loaded version.",
                [(f"max by (model, version) (nv_model_load_duration_secs{BY_MODEL})", "{{model}} v{{version}}")],
                "s", kind="bargauge"), w=16)


def slo_panels(g: Layout) -> None:
    g.row("Objectives and overload (Torpor)")
    g.add(panel("SLO attainment (windowed)", "torpor_slo_attainment: each model's share of requests with an "
                "objective that met it over the server's window (shed requests count as missed); "
                "torpor_node_slo_attainment: all the node's models.",
                [(f"torpor_slo_attainment{BY_MODEL}", "{{instance}} {{model}}"),
                 (f"torpor_node_slo_attainment{BY_INSTANCE}", "{{instance}} all models")], "percentunit"))
    g.add(panel("SLO attainment over the rate window", "torpor_slo_requests met / all, by model.",
                [(f"{rate('torpor_slo_requests', MET)} / {rate('torpor_slo_requests')}", "{{model}}")], "percentunit"))
    g.add(panel("Requests shed", "torpor_requests_shed per second: at arrival or when their turn came, "
                "because late, harmful or stalling.",
                [(rate("torpor_requests_shed", by="model, when, reason"), "{{model}} {{when}} {{reason}}")],
                "reqps"))
    g.add(panel("Scheduler decisions", "torpor_scheduler_decisions per second: run, queue, swap, peer, wait.",
                [(rate("torpor_scheduler_decisions", by="action"), "{{action}}")], "ops"), w=12)
    g.add(panel("Requests served from a resident model", "torpor_swap_hits / (hits + joins + misses): the "
                "share of device requests that found their model resident.",
                [("sum by (instance) (rate(torpor_swap_hits" + BY_INSTANCE + RATE + ")) / sum by (instance) ("
                  + " + ".join(f"rate(torpor_swap_{k}{BY_INSTANCE}{RATE})" for k in ("hits", "joins", "misses"))
                  + ")", "{{instance}}")], "percentunit"), w=12)


def residency_panels(g: Layout) -> None:
    g.row("Residency and swaps (Torpor)")
    g.add(panel("Resident models per device", "torpor_model_resident summed per device.",
                [(f"sum by (instance, device) (torpor_model_resident{BY_INSTANCE})", "{{instance}} {{device}}")]))
    g.add(panel("Models by state", "torpor_model_state: models on a device, loading (a copy in flight) or in "
                "host memory only.",
                [(f"sum by (instance, state) (torpor_model_state{BY_MODEL})", "{{instance}} {{state}}")]))
    g.add(panel("Where each model is resident", "torpor_model_resident now: one row per model version and "
                "device holding its weights.",
                [(f"torpor_model_resident{BY_MODEL} == 1", "")], kind="table", instant=True))
    g.add(panel("Swap-ins", "torpor_swap_ins per second (host or peer copies), and torpor_swap_peer_ins.",
                [(rate("torpor_swap_ins"), "{{model}}"), (rate("torpor_swap_peer_ins"), "{{model}} from a peer")],
                "ops"))
    g.add(panel("Evictions", "torpor_swap_evictions per second.",
                [(rate("torpor_swap_evictions"), "{{model}}")], "ops"))
    g.add(panel("Waits for device memory", "torpor_swap_memory_waits and torpor_swap_timeouts per second.",
                [(rate("torpor_swap_memory_waits"), "{{model}} waited"),
                 (rate("torpor_swap_timeouts"), "{{model}} gave up")], "ops"))
    g.add(panel("Copy bandwidth", "torpor_swap_bytes per second, and per second of copying "
                "(torpor_swap_duration_us).",
                [(rate("torpor_swap_bytes", BY_INSTANCE, "instance"), "{{instance}} moved"),
                 (f"{rate('torpor_swap_bytes', BY_INSTANCE, 'instance')} / "
                  f"({rate('torpor_swap_duration_us', BY_INSTANCE, 'instance')} / 1e6)", "{{instance}} while copying")],
                "Bps"), w=12)
    g.add(panel("Requests joining a swap-in", "torpor_swap_joins per second: requests that shared a copy "
                "already in flight.",
                [(rate("torpor_swap_joins"), "{{model}}")], "ops"), w=12)


def device_panels(g: Layout) -> None:
    g.row("Devices")
    g.add(panel("Device arena", "torpor_device_memory_used_bytes and _free_bytes: the arena reserved for "
                "model weights.",
                [(f"torpor_device_memory_used_bytes{BY_INSTANCE}", "{{instance}} {{device}} used"),
                 (f"torpor_device_memory_free_bytes{BY_INSTANCE}", "{{instance}} {{device}} free")], "bytes"))
    g.add(panel("Device queue length", "torpor_device_queue_length: requests queued or running per device.",
                [(f"torpor_device_queue_length{BY_INSTANCE}", "{{instance}} {{device}}")]))
    g.add(panel("Predicted wait", "torpor_device_predicted_wait_seconds: seconds until the device could start "
                "a new request (the scheduler's backlog, copies included).",
                [(f"torpor_device_predicted_wait_seconds{BY_INSTANCE}", "{{instance}} {{device}}")], "s"))
    g.add(panel("GPU memory", "nv_gpu_memory_used_bytes and _total_bytes from NVML.",
                [(f"nv_gpu_memory_used_bytes{BY_INSTANCE}", "{{instance}} {{gpu_uuid}} used"),
                 (f"nv_gpu_memory_total_bytes{BY_INSTANCE}", "{{instance}} {{gpu_uuid}} total")], "bytes"))
    g.add(panel("GPU utilization", "nv_gpu_utilization from NVML.",
                [(f"nv_gpu_utilization{BY_INSTANCE}", "{{instance}} {{gpu_uuid}}")], "percentunit"))
    g.add(panel("GPU power", "nv_gpu_power_usage against nv_gpu_power_limit.",
                [(f"nv_gpu_power_usage{BY_INSTANCE}", "{{instance}} {{gpu_uuid}}"),
                 (f"nv_gpu_power_limit{BY_INSTANCE}", "{{instance}} {{gpu_uuid}} limit")], "watt"))
    g.add(panel("Host memory", "nv_cpu_memory_used_bytes and _total_bytes: every model's weights live here.",
                [(f"nv_cpu_memory_used_bytes{BY_INSTANCE}", "{{instance}} used"),
                 (f"nv_cpu_memory_total_bytes{BY_INSTANCE}", "{{instance}} total")], "bytes"))
    g.add(panel("CPU utilization", "nv_cpu_utilization.",
                [(f"nv_cpu_utilization{BY_INSTANCE}", "{{instance}}")], "percentunit"))


def dashboard() -> dict:
    g = Layout()
    for section in (request_panels, slo_panels, residency_panels, device_panels):
        section(g)
    return {
        "uid": "torpor-overview",
        "title": "Torpor",
        "description": "Triton's metrics and Torpor's residency, swap and scheduling metrics "
                       "(generated by deploy/generate.py).",
        "tags": ["torpor", "triton", "inference"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            variable("instance", "Instance", "label_values(nv_inference_request_success, instance)"),
            variable("model", "Model", 'label_values(nv_inference_request_success{instance=~"$instance"}, model)'),
        ]},
        "annotations": {"list": []},
        "panels": g.panels,
    }


def dashboard_text() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def prometheus_rule_text() -> str:
    """The PrometheusRule: this header, then the rules file's groups indented under spec."""
    lines = RULES.read_text().splitlines()
    start = lines.index("groups:")
    body = "\n".join(("  " + line) if line else line for line in lines[start:])
    return (
        "# Generated by deploy/generate.py from torpor-rules.yaml: edit that file, then rerun it.\n"
        "#\n"
        "#   kubectl apply -n monitoring -f deploy/prometheus/torpor-prometheusrule.yaml\n"
        "#\n"
        "# Add the labels your Prometheus selects rules by (ruleSelector), e.g. release: <its release>.\n"
        "apiVersion: monitoring.coreos.com/v1\n"
        "kind: PrometheusRule\n"
        "metadata:\n"
        "  name: torpor\n"
        "  labels:\n"
        "    app.kubernetes.io/name: torpor\n"
        "spec:\n"
        f"{body}\n"
    )


OUTPUTS = {DASHBOARD: dashboard_text, PROMETHEUS_RULE: prometheus_rule_text}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 where a file differs")
    args = ap.parse_args(argv)
    stale = []
    for path, render in OUTPUTS.items():
        text = render()
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
        else:
            path.write_text(text)
    for path in stale:
        print(f"{path.relative_to(DEPLOY.parent)} is not what deploy/generate.py writes: run it", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
