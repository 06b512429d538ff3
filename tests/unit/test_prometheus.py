"""torpor.api.prometheus on its own: the collector over a stand-in engine, no server. (The metrics
port of a real server: tests/server/test_metrics.py.)"""

from __future__ import annotations

from prometheus_client.core import Metric
from torpor.api.prometheus import make_registry, render

from torpor.stats import ModelStats


def test_renderer_and_extra_sources():
    """The collector renders Triton's text format and accepts torpor_* sources."""
    class _Engine:
        """The data plane's methods the collector calls, and nothing else."""

        def __init__(self):
            st = ModelStats('we"ird\\name', "1")
            st.record_success(2, 5_000, 1_000, 1_000, 2_000, 1_000)
            st.record_failure(3_000, "BACKEND")
            self.stats = [st]

        def model_stats(self):
            return self.stats

        def has_devices(self):
            return False  # no swap engine

    registry, collector = make_registry(_Engine(), gpu=False)

    def swap_metrics():
        m = Metric("torpor_swap_in_count", "Model swap-ins", "counter")
        m.add_sample("torpor_swap_in_count", {"model": "x"}, 4)
        return [m]

    collector.add_source(swap_metrics)

    def engine_side():
        m = Metric("torpor_swap_bytes", "Bytes swapped in", "counter")
        m.add_sample("torpor_swap_bytes", {"model": "x"}, 1024)
        return [m]

    collector.add_source(engine_side)
    collector.add_source(lambda: 1 / 0)  # a broken source does not break the scrape
    text = render(registry).decode()
    assert '# TYPE nv_inference_request_success counter' in text
    assert 'nv_inference_request_success{model="we\\"ird\\\\name",version="1"} 1\n' in text
    assert 'nv_inference_count{model="we\\"ird\\\\name",version="1"} 2\n' in text
    assert 'nv_inference_request_duration_us{model="we\\"ird\\\\name",version="1"} 5\n' in text
    assert 'reason="BACKEND"} 1\n' in text
    assert 'torpor_swap_in_count{model="x"} 4\n' in text
    assert 'torpor_swap_bytes{model="x"} 1024\n' in text
    assert "nv_cpu_utilization" in text and "nv_gpu_" not in text
