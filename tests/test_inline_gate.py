"""InlineGate: which models may execute on the event loop itself."""

from torpor.engine import InlineGate


def probe(gate: InlineGate, cpu_ns: int) -> None:
    for _ in range(InlineGate.PROBE):
        gate.record(cpu_ns, cpu_ns)


def test_cheap_model_is_promoted_expensive_one_is_not():
    cheap, dear = InlineGate(), InlineGate()
    probe(cheap, 20_000)
    probe(dear, 900_000)
    assert cheap.inline and not dear.inline


def test_a_rare_pause_does_not_demote_but_repeated_blocking_does():
    g = InlineGate()
    probe(g, 20_000)
    g.record(20_000, 5_000_000)  # one slow inline run (a GC pause, say)
    for _ in range(InlineGate.WINDOW):
        g.record(20_000, 30_000)
    g.record(20_000, 5_000_000)  # a new window: strikes were forgotten
    assert g.inline
    for _ in range(InlineGate.STRIKES):
        g.record(1_000, 10_000_000)  # blocks the loop without using CPU (a sleep): wall time counts
    assert not g.inline and g.banned
    probe(g, 1_000)
    assert not g.inline  # banned for good
