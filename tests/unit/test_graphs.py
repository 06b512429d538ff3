"""torpor.runtime.graphs: which batch sizes get graphs, and when a graph may replay."""

from __future__ import annotations

import pytest

from torpor.runtime.graphs import GraphBook, bucket_for, capture_sizes


def test_capture_sizes():
    assert capture_sizes(8) == (1, 2, 4, 8)
    assert capture_sizes(6) == (1, 2, 4, 6)
    assert capture_sizes(8, [4, 8]) == (1, 4, 8)  # Triton's preferred sizes, and 1
    assert capture_sizes(8, [16, 0]) == (1, 2, 4, 8)  # none usable: powers of two
    assert capture_sizes(1) == (1,)
    assert capture_sizes(0) == (0,)  # no batch dimension: one shape
    # past the limit the largest powers go, 1 and the maximum stay
    assert capture_sizes(1000) == (1, 2, 4, 8, 16, 32, 64, 1000)
    assert capture_sizes(64, limit=3) == (1, 2, 64)
    with pytest.raises(ValueError):
        capture_sizes(-1)


def test_bucket_for():
    sizes = (1, 2, 4, 8)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert bucket_for(9, sizes) is None
    assert bucket_for(1, (0,)) == 0


def test_warm_up_capture_then_replay_with_padding():
    book = GraphBook("m", (1, 2, 4, 8), warm=2)
    first = book.plan(3, (16,), "A")
    assert first.mode == "eager" and first.rows == 3 and first.reason == "warming up"
    cap = book.plan(3, (16,), "A")
    assert cap.mode == "capture" and cap.rows == 4  # padded to its bucket
    assert book.captured(cap, (16,), "A", graph="g4")
    again = book.plan(4, (16,), "A")
    assert again.mode == "replay" and again.rows == 4
    assert book.graphs == {(4, (16,)): "g4"}
    c = book.counters
    assert (c.captures, c.replays, c.eager, c.padded_rows, c.recaptures) == (1, 1, 1, 1, 0)
    # a batch above the largest size runs eager, said why
    big = book.plan(9, (16,), "A")
    assert big.mode == "eager" and "above the largest" in big.reason


def test_a_model_that_moves_captures_again_and_one_that_returns_replays():
    book = GraphBook("m", (1, 2), warm=1)
    plan = book.plan(1, (), "A")
    assert plan.mode == "capture" and book.captured(plan, (), "A", "gA")
    # evicted and copied back to the same blocks: the graph still reads the right addresses
    assert book.plan(1, (), "A").mode == "replay"
    # landed elsewhere: every graph is stale, the bucket is captured again there
    plan = book.plan(1, (), "B")
    assert plan.mode == "capture" and not book.graphs
    assert book.captured(plan, (), "B", "gB")
    assert book.counters.recaptures == 1 and book.plan(1, (), "B").mode == "replay"
    # moved while a capture ran: that graph is not kept
    plan = book.plan(2, (), "B")
    assert plan.mode == "capture"
    assert book.plan(1, (), "C").mode == "capture"  # the model is at C now
    assert not book.captured(plan, (), "B", "stale") and (2, ()) not in book.graphs


def test_a_failed_capture_turns_the_model_eager_for_good_with_one_line():
    lines: list[str] = []
    book = GraphBook("resnet", (1, 2), warm=1, log=lines.append)
    plan = book.plan(1, (3, 224, 224), "A")
    assert plan.mode == "capture"
    book.failed(RuntimeError("operation not permitted when stream is capturing"))
    book.failed(RuntimeError("again"))
    assert lines == [("model 'resnet' runs eager: graph capture failed: RuntimeError: "
                      "operation not permitted when stream is capturing")]
    after = [book.plan(n, (3, 224, 224), p) for n, p in ((1, "A"), (2, "A"), (1, "B"))]
    assert {p.mode for p in after} == {"eager"} and all("capture failed" in p.reason for p in after)
    assert not book.captured(plan, (3, 224, 224), "A", "g")


def test_input_shapes_that_vary_get_graphs_up_to_the_limit():
    book = GraphBook("bert", (1,), warm=1, max_graphs=2)
    for seq in (128, 64):
        plan = book.plan(1, (seq,), "A")
        assert plan.mode == "capture" and book.captured(plan, (seq,), "A", f"g{seq}")
    assert book.plan(1, (128,), "A").mode == "replay" and book.plan(1, (64,), "A").mode == "replay"
    third = book.plan(1, (32,), "A")
    assert third.mode == "eager" and "2 graphs held" in third.reason


def test_a_model_without_a_batch_dimension_has_one_graph():
    book = GraphBook("simple", capture_sizes(0), warm=1)
    plan = book.plan(0, (16,), "A")
    assert plan.mode == "capture" and plan.rows == 0
    assert book.captured(plan, (16,), "A", "g") and book.plan(0, (16,), "A").mode == "replay"
