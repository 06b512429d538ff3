"""The cluster routing policy (torpor/scheduling/routing.py): the preference order step by step,
and rendezvous hashing's stability when a node joins or leaves."""

from __future__ import annotations

import pytest

from torpor.scheduling.routing import DEVICE, HOST, LOADING, NodeView, rendezvous_owner, route, weight

NAMES = [f"node-{i}" for i in range(6)]


def views(**states_waits) -> list[NodeView]:
    """NodeViews named by keyword: name=(state of model 'm' or None, predicted wait s)."""
    out = []
    for name, (state, wait) in states_waits.items():
        models = {"m": state} if state else {}
        out.append(NodeView(name=name, models=models, predicted_wait_s=wait))
    return out


def test_device_hot_nodes_that_fit_come_first_earliest_finish_first():
    nodes = views(a=(None, 0.0), b=(DEVICE, 0.05), c=(HOST, 0.0), d=(DEVICE, 0.01))
    order = route("m", 0.2, nodes, exec_s=0.05, copy_s=0.1)
    assert order[:2] == ["d", "b"]
    assert sorted(order) == ["a", "b", "c", "d"]


def test_a_swap_counts_the_copy_pipelined_with_the_run():
    # BERT-like: a 0.14 s copy, a 0.04 s run, 0.18 s to spare. Idle, the copy overlaps the run
    # (0.14 fits); a node with 0.05 s queued does not (0.19)
    nodes = views(a=(HOST, 0.05), b=(None, 0.0))
    assert route("m", 0.18, nodes, exec_s=0.04, copy_s=0.14) == ["b", "a"]


def test_a_hot_node_that_cannot_make_it_comes_after_every_node_that_can():
    # b holds it on a device but its queue is 0.3 s: 0.35 to finish, past 0.2
    nodes = views(a=(None, 0.0), b=(DEVICE, 0.3), c=(HOST, 0.02))
    order = route("m", 0.2, nodes, exec_s=0.05, copy_s=0.1)
    # c swaps from host in time (0.02 + 0.1), a too (0.1); then b, which would miss
    assert order == ["c", "a", "b"]


def test_where_nothing_fits_the_cheapest_comes_first_not_the_least_loaded():
    owner = rendezvous_owner("m", NAMES)
    others = [n for n in NAMES if n != owner]
    # everything is late: a 1 s queue everywhere but one idle node, which still cannot swap in time
    nodes = [NodeView(name=n, predicted_wait_s=0.0 if n == others[0] else 1.0) for n in NAMES]
    nodes = [
        NodeView(name=others[1], models={"m": LOADING}, predicted_wait_s=1.5) if v.name == others[1] else v
        for v in nodes
    ]
    nodes = [
        NodeView(name=others[2], models={"m": DEVICE}, predicted_wait_s=2.0) if v.name == others[2] else v
        for v in nodes
    ]
    order = route("m", 0.1, nodes, exec_s=0.05, copy_s=0.2)
    # on a device, then loading, then the owner, then the rest by earliest finish (the idle one first)
    assert order[:4] == [others[2], others[1], owner, others[0]]
    assert sorted(order) == sorted(NAMES)


def test_host_and_loading_nodes_before_cold_ones_earliest_finish_first():
    nodes = views(a=(None, 0.0), b=(HOST, 0.01), c=(LOADING, 0.04), d=(None, 0.0))
    order = route("m", 0.5, nodes, exec_s=0.05, copy_s=0.1)
    # loading finishes without a copy (0.04 + 0.05) before host's 0.01 + 0.1
    assert order[:2] == ["c", "b"]
    assert set(order[2:]) == {"a", "d"}


def test_a_cold_model_goes_to_its_rendezvous_owner_first():
    nodes = [NodeView(name=n, predicted_wait_s=0.01 * i) for i, n in enumerate(NAMES)]
    owner = rendezvous_owner("m", NAMES)
    order = route("m", 1.0, nodes, exec_s=0.01, copy_s=0.05)
    assert order[0] == owner
    # then the others that fit, earliest finish first
    rest = [n for n in NAMES if n != owner]
    assert order[1:] == rest


def test_a_model_in_host_memory_is_still_cold_the_owner_follows_the_holders():
    owner = rendezvous_owner("m", NAMES)
    holder = next(n for n in NAMES if n != owner)
    nodes = [
        NodeView(name=n, models={"m": HOST} if n == holder else {}, predicted_wait_s=0.02) for n in NAMES
    ]
    order = route("m", 1.0, nodes, copy_s=0.05)
    assert order[:2] == [holder, owner]


def test_host_memory_everywhere_is_no_signal_the_owner_decides():
    # every node loaded the whole repository: host residency cannot tell the nodes apart
    owner = rendezvous_owner("m", NAMES)
    nodes = [
        NodeView(name=n, models={"m": HOST}, predicted_wait_s=0.0 if n != owner else 0.03) for n in NAMES
    ]
    order = route("m", 1.0, nodes, exec_s=0.01, copy_s=0.05)
    assert order[0] == owner
    # a node loading it still comes first: it will have it on a device soonest
    loading = next(n for n in NAMES if n != owner)
    nodes = [NodeView(name=n, models={"m": LOADING if n == loading else HOST}) for n in NAMES]
    assert route("m", 1.0, nodes, copy_s=0.05)[0] == loading


def test_the_owner_is_skipped_when_its_start_misses_the_slack():
    owner = rendezvous_owner("m", NAMES)
    nodes = [NodeView(name=n, predicted_wait_s=1.0 if n == owner else 0.0) for n in NAMES]
    order = route("m", 0.2, nodes, exec_s=0.05, copy_s=0.05)
    assert order[-1] == owner and order[0] != owner


def test_no_objective_every_start_fits():
    nodes = views(a=(DEVICE, 30.0), b=(None, 0.0))
    assert route("m", None, nodes, copy_s=0.1) == ["a", "b"]


def test_ties_break_on_free_bytes_then_weight_the_same_everywhere():
    nodes = [NodeView(name=n, free_bytes=10 if n == "node-3" else 0) for n in NAMES]
    nodes[0] = NodeView(name="node-0", models={"other": DEVICE})
    order = route("m", None, nodes)
    owner = rendezvous_owner("m", NAMES)
    rest = [n for n in NAMES if n not in (owner, "node-3")]
    rest.sort(key=lambda n: -weight("m", n))
    expected = [owner] + (["node-3"] if owner != "node-3" else []) + rest
    assert order == expected
    assert route("m", None, list(reversed(nodes))) == order


def test_empty_and_owner_errors():
    assert route("m", 0.1, []) == []
    with pytest.raises(ValueError):
        rendezvous_owner("m", [])


def test_weights_are_stable_across_processes():
    # blake2b of "m\x00node-0": a fixed value, not Python's salted hash()
    import subprocess
    import sys

    code = "from torpor.scheduling.routing import weight; print(weight('m', 'node-0'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == weight("m", "node-0")


@pytest.mark.parametrize("n", [3, 6, 10])
def test_a_node_joining_or_leaving_moves_about_one_nth_of_models(n):
    models = [f"model-{i}" for i in range(3000)]
    names = [f"n{i}" for i in range(n)]
    before = {m: rendezvous_owner(m, names) for m in models}
    # a node leaves: exactly its models move, about 1/n of them
    gone = names[1]
    after = {m: rendezvous_owner(m, [x for x in names if x != gone]) for m in models}
    moved = [m for m in models if before[m] != after[m]]
    assert all(before[m] == gone for m in moved)
    assert len(moved) == sum(1 for m in models if before[m] == gone)
    assert abs(len(moved) / len(models) - 1 / n) < 0.35 / n
    # a node joins: only models it now owns move, about 1/(n+1) of them
    joined = {m: rendezvous_owner(m, [*names, "new"]) for m in models}
    moved = [m for m in models if before[m] != joined[m]]
    assert all(joined[m] == "new" for m in moved)
    assert abs(len(moved) / len(models) - 1 / (n + 1)) < 0.35 / (n + 1)
    # and every node owns some
    assert set(before.values()) == set(names)
