"""InlineGate: which models may execute on the event loop itself."""

import time

from torpor.dataplane.engine import _timed_execute_inline
from torpor.model import ModelRequest
from torpor.registry.model_entry import InlineGate


def probe(gate: InlineGate, cpu_ns: int) -> None:
    for _ in range(InlineGate.PROBE):
        gate.record(cpu_ns, cpu_ns)


def test_cheap_model_is_promoted_expensive_one_is_not():
    cheap, dear = InlineGate(), InlineGate()
    probe(cheap, 20_000)
    probe(dear, 900_000)
    assert cheap.inline and not dear.inline


def test_a_model_that_sleeps_is_never_promoted():
    g = InlineGate()
    for _ in range(InlineGate.PROBE):
        g.record(30_000, 5_000_000)  # little CPU, but each threaded run took 5 ms: it waits on something
    assert not g.inline


def test_preemption_is_not_the_models_fault():
    g = InlineGate()
    probe(g, 20_000)
    for _ in range(4 * InlineGate.STRIKES):
        g.record(20_000, 8_000_000)  # descheduled for 8 ms on a busy machine: no CPU, no blocking
    assert g.inline


def test_a_rare_pause_does_not_demote_but_repeated_blocking_does():
    g = InlineGate()
    probe(g, 20_000)
    g.record(20_000, 5_000_000, blocked=True)  # one slow inline run
    for _ in range(InlineGate.WINDOW):
        g.record(20_000, 30_000)
    g.record(20_000, 5_000_000, blocked=True)  # a new window: strikes were forgotten
    assert g.inline
    for _ in range(InlineGate.STRIKES):
        g.record(1_000, 10_000_000, blocked=True)  # blocks the loop without using CPU (a sleep)
    assert not g.inline and g.banned


def test_long_computation_demotes():
    g = InlineGate()
    probe(g, 20_000)
    for _ in range(InlineGate.STRIKES):
        g.record(3_000_000, 3_100_000)
    assert not g.inline


def test_banned_models_are_probed_again_with_backoff_then_for_good():
    g = InlineGate()
    for n in range(1, InlineGate.MAX_BANS + 1):
        probe(g, 1_000)
        assert g.inline
        for _ in range(InlineGate.STRIKES):
            g.record(1_000, 10_000_000, blocked=True)
        assert g.banned and g.bans == n
        probe(g, 1_000)
        assert not g.inline  # not before the back-off has passed
        g.retry_at = time.monotonic() - 1
    probe(g, 1_000)
    assert not g.inline  # banned for good after MAX_BANS


class _Sleeper:
    def execute(self, requests):
        time.sleep(0.003)
        return [{}]


class _Spinner:
    def execute(self, requests):
        t = time.thread_time()
        while time.thread_time() - t < 0.001:
            pass
        return [{}]


def test_inline_timing_tells_blocking_from_computing():
    _, _, cpu_ns, blocked = _timed_execute_inline(_Sleeper(), ModelRequest({}, []))
    assert blocked and cpu_ns < 2_000_000
    _, _, cpu_ns, blocked = _timed_execute_inline(_Spinner(), ModelRequest({}, []))
    assert cpu_ns >= 900_000
