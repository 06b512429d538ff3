"""Deployment artifacts under deploy/, checked offline.

- The Helm chart is linted and rendered by Helm's own Go engine (helm-python-sdk, no cluster),
  and every rendered manifest is validated against the Kubernetes schemas of KUBE_VERSION
  (kubernetes-validate, strict: unknown fields refused).
- KServe's and the Prometheus operator's kinds are validated against the minimal schemas in
  deploy/schemas/ (their CRDs' fields that deploy/ uses), whose Kubernetes types are
  kubernetes-validate's for KUBE_VERSION.
- Every container's arguments are parsed by `torpor serve`'s own parser.
- The Grafana dashboard's and the alert rules' queries are parsed as PromQL (promql-parser) and
  may name only metrics a running server exports, read from its /metrics (plus the GPU gauges,
  read from the NVML collector over a stand-in NVML, and the residency gauges still being added).
- Where promtool is installed, the rules are also checked and unit-tested by it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import types
import urllib.request
from pathlib import Path

import pytest
import yaml

from ..conftest import Server
from ..models import mlp_config
from ..server.test_metrics import scrape

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "torpor"
KUBE_VERSION = "1.33.0"

# (apiVersion, kind) -> the schema in deploy/schemas/ for kinds Kubernetes itself does not define
CRD_SCHEMAS = {
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "clusterservingruntime-serving-v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-serving-v1beta1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
}

# Gauges of the residency report (issue 22 item 2) that the dashboard and alerts already use;
# while the server does not export one yet, the test allows it by name and reports it. (The
# report's free bytes per device are torpor_device_memory_free_bytes, exported already.)
PENDING_METRICS = {"torpor_device_queue_length", "torpor_device_predicted_wait_seconds", "torpor_slo_attainment",
                   "torpor_node_slo_attainment", "torpor_model_state"}
# What the server exported when the dashboard was written: each has a panel.
SHOWN_METRICS = {
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count", "nv_inference_exec_count",
    "nv_inference_request_duration_us", "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
    "nv_inference_pending_request_count", "nv_model_load_duration_secs", "nv_gpu_utilization",
    "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes", "nv_gpu_power_usage", "nv_gpu_power_limit",
    "nv_cpu_utilization", "nv_cpu_memory_total_bytes", "nv_cpu_memory_used_bytes",
    "torpor_swap_ins", "torpor_swap_peer_ins", "torpor_swap_bytes", "torpor_swap_duration_us", "torpor_swap_hits",
    "torpor_swap_joins", "torpor_swap_misses", "torpor_swap_evictions", "torpor_swap_memory_waits",
    "torpor_swap_timeouts", "torpor_model_resident", "torpor_device_memory_used_bytes",
    "torpor_device_memory_free_bytes", "torpor_scheduler_decisions", "torpor_slo_requests", "torpor_requests_shed",
}
# Labels Prometheus attaches to every scraped series (target and Kubernetes discovery labels).
TARGET_LABELS = {"instance", "job", "namespace", "pod", "container", "service", "endpoint"}


def need(module: str, requirement: str):
    return pytest.importorskip(module, reason=f"needs {requirement} (pip install it, as the test extra will)")


# --- validation -------------------------------------------------------------------------------

def _crd_validator(schema_file: str):
    kv = need("kubernetes_validate", "kubernetes-validate==1.37.0")
    import jsonschema
    from referencing import Registry, Resource

    defs = kv.utils.schema_contents(f"kubernetes-json-schema/v{KUBE_VERSION}-local-strict/_definitions.json",
                                    KUBE_VERSION)
    schema = json.loads((DEPLOY / "schemas" / schema_file).read_text())
    registry = Resource.from_contents(defs) @ Registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate(doc: dict) -> None:
    """Raise unless `doc` is valid for KUBE_VERSION (Kubernetes kinds) or its CRD (the others)."""
    schema_file = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if schema_file is not None:
        _crd_validator(schema_file).validate(doc)
        return
    kv = need("kubernetes_validate", "kubernetes-validate==1.37.0")
    kv.validate(doc, KUBE_VERSION, strict=True)


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def serve_args(container: dict):
    """The container's `torpor serve` arguments, parsed by the server's own parser."""
    from torpor.cli import build_parser

    assert container["command"] == ["torpor", "serve"]  # not the image's entrypoint, which names /models
    return build_parser().parse_args(["serve", *container["args"]])


# --- Helm chart ---------------------------------------------------------------------------------

def render(values: dict | None = None) -> dict[str, dict]:
    """The chart rendered by Helm's engine: {kind: manifest}."""
    helm = need("helm_python", "helm-python-sdk==0.2.2")
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values or {}, name="demo", namespace="ml", is_install=True)
    docs = {}
    for path, text in out.items():
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                assert doc["kind"] not in docs, f"two {doc['kind']}s rendered"
                docs[doc["kind"]] = doc
    return docs


def test_chart_lints_clean():
    helm = need("helm_python", "helm-python-sdk==0.2.2")
    report = helm.lint(CHART, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    # severity 1 is INFO (e.g. 'icon is recommended'); warnings and errors are not tolerated
    assert [m for m in report["messages"] if m["severity"] > 1] == []


def test_chart_defaults_render_valid_manifests():
    docs = render()
    assert set(docs) == {"Deployment", "Service"}  # ServiceMonitor and HPA are opt-in
    for doc in docs.values():
        validate(doc)
    dep, svc = docs["Deployment"], docs["Service"]
    assert dep["spec"]["replicas"] == 1
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    args = serve_args(c)
    assert (args.model_repository, args.http_port, args.grpc_port, args.metrics_port) == (["/models"], 8000, 8001, 8002)
    assert (args.devices, args.device_memory_fraction, args.exit_timeout_secs) == ("cuda", 0.8, 30.0)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] == 600
    assert "volumeMounts" not in c and "volumes" not in pod["spec"]  # the image's bundled models
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001  # the Dockerfile's user
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    assert pod["spec"]["terminationGracePeriodSeconds"] == 45
    # the Service reaches the container's named ports, and selects the pods
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert {p["name"]: (p["port"], named[p["targetPort"]]) for p in svc["spec"]["ports"]} == {
        "http": (8000, 8000), "grpc": (8001, 8001), "metrics": (8002, 8002)}
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


def test_chart_with_everything_on():
    values = {
        "numGpus": 2, "devices": "cuda:0,1", "deviceMemoryFraction": 0.6, "defaultSloMs": 250,
        "ports": {"http": 8080, "grpc": 9000, "metrics": 9102},
        "modelRepository": {"path": "/mnt/models", "volume": {"nfs": {"server": "10.0.0.2", "path": "/srv/models"}}},
        "serverArgs": ["--model-control-mode=explicit", "--load-model=resnet50", "--log-verbose=1"],
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6},
        "image": {"repository": "registry.example/torpor", "tag": "0.2.0"},
    }
    docs = render(values)
    assert set(docs) == {"Deployment", "Service", "ServiceMonitor", "HorizontalPodAutoscaler"}
    for doc in docs.values():
        validate(doc)
    dep, svc, sm, hpa = (docs[k] for k in ("Deployment", "Service", "ServiceMonitor", "HorizontalPodAutoscaler"))
    assert "replicas" not in dep["spec"]  # the HPA owns the count
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "registry.example/torpor:0.2.0"
    args = serve_args(c)
    assert (args.http_port, args.grpc_port, args.metrics_port) == (8080, 9000, 9102)
    assert (args.devices, args.device_memory_fraction, args.default_slo_ms) == ("cuda:0,1", 0.6, 250.0)
    assert (args.model_control_mode, args.load_model, args.log_verbose) == ("explicit", ["resnet50"], 1)
    assert args.model_repository == ["/mnt/models"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert c["volumeMounts"] == [{"name": "model-repository", "mountPath": "/mnt/models", "readOnly": True}]
    assert pod["volumes"] == [{"name": "model-repository", "nfs": {"server": "10.0.0.2", "path": "/srv/models"}}]
    # the ServiceMonitor scrapes the Service's metrics port, selected by the Service's labels
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    assert any(p["name"] == "metrics" and p["port"] == 9102 for p in svc["spec"]["ports"])
    # the HPA scales this Deployment on the custom metrics prometheus-adapter's rules serve
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    served = {r["name"]["as"] for r in adapter_rules()}
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} == served


def test_chart_cpu_only():
    docs = render({"numGpus": 0, "devices": "cpu:2"})
    validate(docs["Deployment"])
    (c,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert serve_args(c).devices == "cpu:2"


@pytest.mark.parametrize("values, says", [
    ({"numGpus": 0}, 'numGpus is 0 but devices is "cuda"'),
    ({"deviceMemoryFraction": 1.5}, "deviceMemoryFraction"),
    ({"devices": "gpu"}, "devices"),
    ({"numGPUs": 2}, "numGPUs"),  # a misspelt value is refused, not ignored
    ({"serverArgs": ["log-verbose=1"]}, "serverArgs"),
])
def test_chart_refuses_bad_values(values, says):
    helm = need("helm_python", "helm-python-sdk==0.2.2")
    with pytest.raises(helm.HelmError) as e:
        render(values)
    assert says in str(e.value)


def adapter_rules() -> list[dict]:
    return yaml.safe_load((DEPLOY / "helm" / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]


# --- KServe ------------------------------------------------------------------------------------

def test_kserve_runtime_and_inference_service():
    (runtime,) = load_docs(DEPLOY / "kserve" / "torpor-runtime.yaml")
    (isvc,) = load_docs(DEPLOY / "kserve" / "inferenceservice.yaml")
    validate(runtime)
    validate(isvc)
    spec = runtime["spec"]
    (c,) = spec["containers"]
    assert c["name"] == "kserve-container"
    # KServe's Triton conventions: v2 over HTTP 8080 and gRPC 9000, the repository at /mnt/models
    args = serve_args(c)
    assert (args.http_port, args.grpc_port, args.model_repository) == (8080, 9000, ["/mnt/models"])
    assert args.allow_http and args.allow_grpc
    assert set(spec["protocolVersions"]) == {"v2", "grpc-v2"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert "livenessProbe" not in c  # a pod still loading its models is not restarted
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001 and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # both scrape conventions point at the metrics port the server listens on
    ann = spec["annotations"]
    assert ann["prometheus.kserve.io/port"] == ann["prometheus.io/port"] == str(args.metrics_port)
    assert ann["prometheus.kserve.io/path"] == ann["prometheus.io/path"] == "/metrics"
    # the InferenceService picks this runtime for a format and protocol it declares
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"] in [{k: f[k] for k in ("name", "version")} for f in spec["supportedModelFormats"]]
    assert model["protocolVersion"] in spec["protocolVersions"]
    assert model["storageUri"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


@pytest.mark.parametrize("path, change", [
    ("kserve/torpor-runtime.yaml", lambda d: d["spec"].update(supportedModelFormat=[])),  # misspelt
    ("kserve/torpor-runtime.yaml", lambda d: d["spec"]["containers"][0].update(argz=[])),  # via Container
    ("kserve/torpor-runtime.yaml", lambda d: d["spec"].update(protocolVersions=["v3"])),
    ("kserve/torpor-runtime.yaml", lambda d: d["spec"]["supportedModelFormats"][0].update(priority=0)),
    ("kserve/inferenceservice.yaml", lambda d: d["spec"]["predictor"]["model"].pop("modelFormat")),
    ("kserve/inferenceservice.yaml", lambda d: d["spec"]["predictor"]["model"]["resources"].update(limit={})),
    ("kserve/inferenceservice.yaml", lambda d: d["metadata"]["annotations"].update(
        {"serving.kserve.io/deploymentMode": "Raw"})),
    ("prometheus/torpor-prometheusrule.yaml", lambda d: d["spec"]["groups"][0]["rules"][0].update(record="x")),
    ("prometheus/torpor-prometheusrule.yaml", lambda d: d["spec"]["groups"][0]["rules"][0].update({"for": "10 m"})),
])
def test_crd_schemas_refuse_what_their_crds_refuse(path, change):
    (doc,) = load_docs(DEPLOY / path)
    validate(doc)
    import jsonschema  # there since kubernetes-validate is (validate skips without it)

    bad = copy.deepcopy(doc)
    change(bad)
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)


# --- Alert rules -------------------------------------------------------------------------------

def rule_groups() -> list[dict]:
    return yaml.safe_load((DEPLOY / "prometheus" / "torpor-rules.yaml").read_text())["groups"]


def alerts() -> list[dict]:
    return [r for g in rule_groups() for r in g["rules"]]


def test_generated_files_are_current():
    spec = importlib.util.spec_from_file_location("deploy_generate", DEPLOY / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.main(["--check"]) == 0, "run: python deploy/generate.py"


def test_prometheus_rule_carries_the_rules_file():
    (rule,) = load_docs(DEPLOY / "prometheus" / "torpor-prometheusrule.yaml")
    validate(rule)
    assert rule["spec"]["groups"] == rule_groups()


def test_alert_rules_are_well_formed():
    rules = alerts()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for want in ("TorporSloAttainmentLow", "TorporQueueGrowing", "TorporSwapThrash",
                 "TorporDeviceMemoryPressure", "TorporRequestsShed"):
        assert want in names
    for r in rules:
        assert re.fullmatch(r"[0-9]+[smh]", r["for"]), r["alert"]
        assert r["labels"]["severity"] in {"warning", "critical"}
        assert r["annotations"]["summary"] and r["annotations"]["description"]


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool (Prometheus, e.g. Debian's prometheus package) is not installed")
def test_promtool_checks_and_unit_tests_the_rules(tmp_path):
    rules = DEPLOY / "prometheus" / "torpor-rules.yaml"
    # the PrometheusRule's spec is a rules file too
    (rule,) = load_docs(DEPLOY / "prometheus" / "torpor-prometheusrule.yaml")
    spec_file = tmp_path / "from-prometheusrule.yaml"
    spec_file.write_text(yaml.safe_dump(rule["spec"]))
    for f in (rules, spec_file):
        check = subprocess.run(["promtool", "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        assert f"SUCCESS: {len(alerts())} rules found" in check.stdout
    unit = subprocess.run(["promtool", "test", "rules", "torpor-rules.test.yaml"], cwd=rules.parent,
                          capture_output=True, text=True, timeout=120)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    # every alert has a unit test
    tested = {t["alertname"] for case in yaml.safe_load((rules.parent / "torpor-rules.test.yaml").read_text())["tests"]
              for t in case["alert_rule_test"]}
    assert tested == {r["alert"] for r in alerts()}


# --- Metrics named by the dashboard, the alerts and the autoscaler -------------------------------

class _FakeNvml(types.ModuleType):
    """The pynvml calls the GPU collector makes, answered for one GPU."""

    def __init__(self):
        super().__init__("pynvml")
        ns = types.SimpleNamespace
        self.nvmlInit = lambda: None
        self.nvmlDeviceGetCount = lambda: 1
        self.nvmlDeviceGetHandleByIndex = lambda i: i
        self.nvmlDeviceGetUUID = lambda h: "GPU-00000000-0000-0000-0000-000000000000"
        self.nvmlDeviceGetUtilizationRates = lambda h: ns(gpu=50)
        self.nvmlDeviceGetMemoryInfo = lambda h: ns(total=80 << 30, used=60 << 30)
        self.nvmlDeviceGetPowerUsage = lambda h: 300_000
        self.nvmlDeviceGetPowerManagementLimit = lambda h: 700_000
        self.nvmlDeviceGetTotalEnergyConsumption = lambda h: 1_000_000


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, set[str]]:
    """{metric name: its label names} as a server exports them: a real server's /metrics after
    one request to a model late-bound to a CPU virtual device, plus the GPU gauges (NVML sees
    no GPU here) from the collector itself over a stand-in pynvml."""
    need("promql_parser", "promql-parser==0.11.0")  # what the tests using these names parse with
    repo = tmp_path_factory.mktemp("deploy_repo")
    (repo / "mlp" / "1").mkdir(parents=True)
    config = mlp_config("mlp", 1, 64)
    (repo / "mlp" / "config.pbtxt").write_text(
        config + 'parameters { key: "torpor.slo_ms" value: { string_value: "5000" } }\n')
    server = Server(repo, "--devices", "cpu", "--device-memory-bytes", "16MiB").start(
        tmp_path_factory.mktemp("deploy_logs"))
    try:
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                       "data": [0.5] * 64}]}).encode()
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/mlp/infer", body, timeout=60) as r:
            assert r.status == 200
        samples, _, _ = scrape(server)
    finally:
        server.stop()
    names: dict[str, set[str]] = {}
    for name, labels in samples:
        names.setdefault(name, set()).update(k for k, _ in labels)

    from torpor.api import prometheus

    saved = sys.modules.get("pynvml")
    sys.modules["pynvml"] = _FakeNvml()
    try:
        for family in prometheus._Nvml().collect():
            for s in family.samples:
                names.setdefault(s.name, set()).update(s.labels)
    finally:
        if saved is None:
            sys.modules.pop("pynvml", None)
        else:
            sys.modules["pynvml"] = saved
    assert "nv_gpu_memory_used_bytes" in names
    return names


def _grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced by what they stand for when 'All' is chosen."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def _nodes(expr, kind: str) -> list:
    """The nodes of one PromQL class (VectorSelector, AggregateExpr ...) in a parsed query."""
    pp = need("promql_parser", "promql-parser==0.11.0")
    found: list = []
    pp.walk(expr, lambda n: found.append(n) if isinstance(n, getattr(pp, kind)) else None)
    return found


def check_queries(exprs: list[str], exported: dict[str, set[str]]) -> set[str]:
    """Parse each query; every metric must be exported (or pending), every label it filters or
    groups by must be one the metric carries. Returns the pending metrics the queries use."""
    pp = need("promql_parser", "promql-parser==0.11.0")
    pending_used: set[str] = set()
    for expr in exprs:
        tree = pp.parse(expr)
        for sel in _nodes(tree, "VectorSelector"):
            name = sel.name
            assert name, f"a selector without a metric name in {expr!r}"
            if name not in exported:
                assert name in PENDING_METRICS, f"{name} is not exported by the server ({expr!r})"
                pending_used.add(name)
                continue
            for m in sel.matchers.matchers:
                assert m.name in exported[name] | TARGET_LABELS, f"{name} has no label {m.name} ({expr!r})"
        for agg in _nodes(tree, "AggregateExpr"):
            inner = {sel.name for sel in _nodes(agg.expr, "VectorSelector")}
            if agg.modifier is not None and inner <= exported.keys():
                have = set().union(*(exported[n] for n in inner)) | TARGET_LABELS
                assert set(agg.modifier.labels) <= have, f"{inner} lack a label grouped by in {expr!r}"
    return pending_used


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "torpor-dashboard.json").read_text())


def test_dashboard_is_well_formed():
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"] and len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        assert all(t["expr"] for t in p["targets"])


def test_dashboard_queries_name_only_exported_metrics(exported):
    d = dashboard()
    exprs = [_grafana_to_promql(t["expr"]) for p in d["panels"] if p["type"] != "row" for t in p["targets"]]
    exprs += [_grafana_to_promql(v["query"]["query"].removeprefix("label_values(").rsplit(",", 1)[0])
              for v in d["templating"]["list"] if v["type"] == "query"]
    pending = check_queries(exprs, exported)
    # a panel for each of Triton's and Torpor's metrics, and for the residency gauges
    pp = need("promql_parser", "promql-parser==0.11.0")
    shown = {s.name for e in exprs for s in _nodes(pp.parse(e), "VectorSelector")}
    assert not (SHOWN_METRICS | PENDING_METRICS) - shown, (SHOWN_METRICS | PENDING_METRICS) - shown
    assert SHOWN_METRICS <= exported.keys(), SHOWN_METRICS - exported.keys()
    print(f"\nresidency gauges not exported yet, allowed by name: {sorted(pending) or 'none'}")


def test_alert_queries_name_only_exported_metrics(exported):
    check_queries([r["expr"] for r in alerts()], exported)


def test_autoscaler_metrics_are_served_from_exported_series(exported):
    for rule in adapter_rules():
        series = rule["seriesQuery"]
        query = (rule["metricsQuery"].replace("<<.Series>>", series.split("{")[0])
                 .replace(",<<.LabelMatchers>>", ',namespace="ml",pod="p"')
                 .replace("<<.LabelMatchers>>", 'namespace="ml",pod="p"').replace("<<.GroupBy>>", "pod"))
        check_queries([series, query], exported)
        assert re.fullmatch(rule["name"]["matches"], series.split("{")[0])
