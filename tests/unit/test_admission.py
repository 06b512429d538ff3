"""torpor.scheduling.admission: the queue-admission rules the server and the simulator share, on small
hand-built states (no clock, no event loop)."""

from __future__ import annotations

import math
from types import SimpleNamespace

from torpor.scheduling.admission import (
    COSTS,
    DEFER_MARGIN_S,
    FREE,
    HARMS,
    PROBE_INTERVAL_S,
    STARVED_S,
    defer_deadline,
    deferred,
    expires_at,
    harm_level,
    outlasted,
    probe,
    shed_at_arrival,
    shed_when_staged,
    spare_victims,
    stage_at_once,
    stage_level,
    stage_next,
    urgent,
    victim_order,
    work_ahead,
    would_delay,
)
from torpor.scheduling.eviction import Candidate, CostAwarePolicy, LRUPolicy
from torpor.scheduling.scheduler import Decision, Option

_seq = iter(range(10**6))


def ticket(estimate: float, *, key: float = math.inf, due: float = math.inf, guard: float = math.inf,
           ready_at: float = 0.0, transfer: float = 0.0, staged: bool = True, started_at: float | None = None,
           **extra) -> SimpleNamespace:
    return SimpleNamespace(key=key, seq=next(_seq), estimate=estimate, due=due, guard=guard, ready_at=ready_at,
                           transfer=transfer, staged=staged, started_at=started_at, **extra)


def close(a: float, b: float) -> bool:
    return abs(a - b) < 1e-9


# where a request queues -------------------------------------------------------------------------


def test_first_come_first_served_counts_everything_and_queues_last():
    ts = [ticket(0.2, started_at=0.0), ticket(0.1), ticket(0.3)]
    ahead, key, stage_in = work_ahead(ts, 0.05, None, 0.01)
    assert close(ahead, 0.55) and key == math.inf  # 0.2 - 0.05 of the running one, then 0.1 and 0.3
    assert close(stage_in, 0.25)  # staged when the last queued one starts (lookahead 1)


def test_a_short_deadline_goes_ahead_of_work_with_time_to_spare():
    ts = [ticket(0.2, started_at=0.0, key=5.0, due=5.0, guard=4.5),
          ticket(0.2, key=5.0, due=5.0, guard=4.5), ticket(0.2, key=5.0, due=5.0, guard=4.5)]
    ahead, key, stage_in = work_ahead(ts, 0.0, 0.3, 0.02)
    assert key == 0.3 and close(ahead, 0.2)  # only the running request is ahead of it
    assert close(stage_in, 0.0)  # a stage is free for the first place in the queue


def test_it_queues_behind_all_when_going_ahead_would_push_one_past_its_guard():
    ts = [ticket(0.2, key=0.5, due=0.5, guard=0.45), ticket(0.2, key=0.6, due=0.6, guard=0.45)]
    ahead, key, _ = work_ahead(ts, 0.0, 0.3, 0.1)  # in front, the second would end at 0.5 > 0.45
    assert key == 0.6 and close(ahead, 0.4)  # behind both: key is the last one's


def test_a_request_already_late_is_not_protected():
    # the queued request ends at 0.6 without the newcomer, past its own due (0.5): nothing to protect
    ts = [ticket(0.6, key=0.5, due=0.5, guard=0.45)]
    ahead, key, _ = work_ahead(ts, 0.0, 0.3, 0.1)
    assert key == 0.3 and close(ahead, 0.0)


def test_its_own_copy_counts_where_the_caller_knows_it():
    ts = [ticket(0.1, key=1.0, due=1.0, guard=0.25)]
    assert work_ahead(ts, 0.0, 0.5, 0.05)[1] == 0.5  # its run alone: the other ends at 0.15
    # but it holds the device until its own model lands at 0.2: the other would end at 0.3 > 0.25
    assert work_ahead(ts, 0.0, 0.5, 0.05, own_ready=lambda: 0.2)[1] == 1.0


def test_own_copy_is_asked_only_where_it_would_go_ahead():
    asked = []
    work_ahead([ticket(0.1, key=0.2, due=0.2)], 0.0, 0.5, 0.05, own_ready=lambda: asked.append(1) or 0.0)
    assert not asked


def test_a_copy_not_started_lands_from_the_requests_stage_time():
    # running until 0.1; A (staged, resident) runs 0.1-0.2; B's copy (0.3 s) starts only when B is
    # staged, when A starts (lookahead 1): it lands at 0.4, and B ends then
    ts = [ticket(0.1, started_at=0.0), ticket(0.1, key=1.0), ticket(0.1, key=2.0, transfer=0.3, staged=False,
                                                                       ready_at=0.3)]
    ahead, key, stage_in = work_ahead(ts, 0.0, 10.0, 0.01)
    assert close(ahead, 0.4) and key == 10.0
    assert close(stage_in, 0.2)  # a new request is staged when B starts running
    # with two stages beyond the running ones, B is staged now: its copy lands at 0.3
    ahead, _, stage_in = work_ahead(ts, 0.0, 10.0, 0.01, lookahead=2)
    assert close(ahead, 0.3) and close(stage_in, 0.1)
    # staged when the device reaches it (no lookahead): lands at 0.5
    assert close(work_ahead(ts, 0.0, 10.0, 0.01, lookahead=0)[0], 0.5)
    # a staged ticket's own landing counts as it is
    ts[2].staged = True
    assert close(work_ahead(ts, 0.0, 10.0, 0.01)[0], 0.3)


def test_the_caller_may_say_when_the_running_work_ends():
    ts = [ticket(0.1, started_at=0.0), ticket(0.2, key=1.0)]
    assert close(work_ahead(ts, 0.0, 5.0, 0.01)[0], 0.3)
    assert close(work_ahead(ts, 0.0, 5.0, 0.01, free_at=0.5)[0], 0.7)


def test_a_run_starts_no_sooner_than_its_first_group_lands():
    ts = [ticket(0.1, key=1.0, ready_at=0.35, first_at=0.3)]
    assert close(work_ahead(ts, 0.0, 5.0, 0.01)[0], 0.4)  # 0.3 + 0.1, later than its landing
    del ts[0].first_at
    assert close(work_ahead(ts, 0.0, 5.0, 0.01)[0], 0.35)  # a ticket without one: its landing


def test_projected_ends_in_queue_order():
    a, b = ticket(0.1, key=2.0), ticket(0.2, key=1.0)
    ends: list = []
    work_ahead([a, b], 0.0, 5.0, 0.01, ends=ends)
    assert [(k, round(t, 6)) for k, t in ends] == [(b, 0.2), (a, 0.3)]


def test_ties_in_key_go_first_come_first_served():
    a, b = ticket(0.1, key=1.0), ticket(0.2, key=1.0)
    ends: list = []
    work_ahead([b, a], 0.0, 5.0, 0.01, ends=ends)
    assert [k for k, _ in ends] == [a, b]


# when a request takes memory --------------------------------------------------------------------


def test_stage_at_once_when_free_and_nobody_waits():
    assert stage_at_once(5.0, 1, 2, None, [1.0])
    assert not stage_at_once(5.0, 2, 2, None, [1.0, 2.0])  # full, not more urgent than a holder
    assert not stage_at_once(5.0, 1, 2, 3.0, [1.0])  # someone waits ahead of it


def test_urgent_requests_get_a_stage_up_to_twice_the_permits():
    assert urgent(0.5, 2, 2, 3.0, [1.0, 2.0])
    assert stage_at_once(0.5, 3, 2, 3.0, [1.0, 2.0, 0.6])
    assert not stage_at_once(0.5, 4, 2, 3.0, [1.0, 2.0, 0.6, 0.7])  # the bound
    assert not urgent(0.5, 2, 2, 0.4, [1.0, 2.0])  # someone waiting is more urgent still
    assert not urgent(0.5, 2, 2, math.inf, [0.1, 0.2])  # no holder is less urgent


def test_deferral_lasts_until_shortly_before_it_could_no_longer_copy_and_run_in_time():
    assert close(defer_deadline(1.0, 0.1, 0.3), 0.6 - DEFER_MARGIN_S)
    assert close(defer_deadline(1.0, 0.1, 0.3, margin=0.0), 0.6)
    assert defer_deadline(math.inf, 0.1, 0.3) == 0.0  # no objective: never deferred
    # still waiting for a stage at its last moment to start and end by its deadline: refused then
    assert close(expires_at(1.0, 0.1), 0.9) and expires_at(math.inf, 0.1) == math.inf
    calls = []

    def harms() -> int:
        calls.append(1)
        return HARMS

    assert deferred(0.5, 0.6, harms)
    assert deferred(0.5, 0.6, lambda: COSTS)
    assert not deferred(0.5, 0.6, lambda: FREE)
    assert not deferred(0.6, 0.6, harms)  # its time ran out
    assert not deferred(0.5, 0.0, harms)  # may not be deferred
    assert len(calls) == 1  # the level only where it matters
    assert stage_level(0.6, harms) == HARMS and stage_level(0.6, lambda: COSTS) == COSTS
    assert stage_level(0.0, harms) == FREE  # a request that may not be deferred harms nobody


def test_stage_next_passes_over_the_deferred_and_says_when_to_look_again():
    waiting = [SimpleNamespace(name="a", until=0.5), SimpleNamespace(name="b", until=0.3),
               SimpleNamespace(name="c", until=0.0), SimpleNamespace(name="d", until=0.0)]
    level = {"a": HARMS, "b": COSTS, "c": HARMS}  # c may not be deferred: staged although it harms

    def pick(start: int = 0):
        return stage_next(waiting, 0.1, lambda w: w.until, lambda w: level.get(w.name, FREE), start)

    assert pick() == (2, 0.3)
    assert pick(3) == (3, math.inf)
    level.clear()
    assert pick() == (0, math.inf)
    assert stage_next(waiting[:2], 0.1, lambda w: w.until, lambda w: COSTS) == (None, 0.3)


def test_harm_level():
    victims = [("x", 10), ("y", 10), ("w", 10)]  # w is wanted, sorted last
    # resident, or it fits: nothing evicted
    assert harm_level("k", 10, {"k", "x"}, victims, {"w"}) == FREE
    assert harm_level("k", 0, {"x"}, victims, {"w"}) == FREE
    # x alone is enough, and no one waits for a resident model
    assert harm_level("k", 10, {"x", "y"}, victims, {"w"}) == FREE
    # it needs x, y and w: w is wanted
    assert harm_level("k", 30, {"x", "y"}, victims, {"w"}) == HARMS
    # a wanted model is resident (requests that need no copy wait): any copy costs them, the
    # coldest victim's too (it was FREE when only hotter victims cost)
    assert harm_level("k", 10, {"x", "y", "w"}, victims, {"w"}) == COSTS
    assert harm_level("k", 20, {"x", "y", "w"}, victims, {"w"}) == COSTS
    assert harm_level("k", 30, {"x", "y", "w"}, victims, {"w"}) == HARMS  # and then w itself


def test_a_request_whose_copy_harms_is_shed_at_arrival_when_the_queue_outlasts_its_slack():
    assert outlasted(0.3, 0.2) and not outlasted(0.1, 0.2)


def test_copies_started_before_staging_evict_only_spare_models():
    idle = [Candidate("a", 10, 1.0, 0.0, 0.1), Candidate("w", 10, 2.0, 0.0, 0.1), Candidate("b", 10, 3.0, 0.0, 0.1)]
    assert spare_victims(idle, 30, 20, {"w"}) == []  # room already
    assert [c.key for c in spare_victims(idle, 5, 20, {"w"})] == ["a", "b"]  # w is wanted: skipped
    assert spare_victims(idle, 0, 25, {"w"}) is None  # not enough without w: evict nothing


def test_would_delay_a_queued_request():
    ts = [ticket(0.1, key=1.0, due=1.0, guard=0.3)]
    assert not would_delay(ts, 0.0, 0.1)  # it ends at 0.2 behind a 0.1 s stall: within its guard
    assert would_delay(ts, 0.0, 0.25)  # at 0.35: past it
    assert not would_delay([], 0.0, 10.0)


def test_victim_order_keeps_wanted_models_last():
    cands = [Candidate("a", 10, 1.0, 0.0, 0.1), Candidate("b", 10, 2.0, 0.0, 0.1), Candidate("c", 10, 3.0, 0.0, 0.1)]
    assert [c.key for c in victim_order(LRUPolicy(), cands, 5.0)] == ["a", "b", "c"]
    assert [c.key for c in victim_order(LRUPolicy(), cands, 5.0, {"a"})] == ["b", "c", "a"]
    hot = [Candidate("a", 10, 1.0, 9.0, 0.1), Candidate("b", 10, 2.0, 0.0, 0.1)]
    assert [c.key for c in victim_order(CostAwarePolicy(), hot, 5.0)] == ["b", "a"]


def test_shed_when_staged():
    assert shed_when_staged(0.8, 0.1, 0.2, False, 1.0, FREE) == "late"  # 0.8 + 0.1 + 0.2 > 1.0
    assert shed_when_staged(0.8, 0.1, 0.2, True, 1.0, FREE) is None  # resident: no copy to wait for
    assert shed_when_staged(0.8, 0.1, 0.2, True, 1.0, HARMS) == "harms"
    assert shed_when_staged(0.5, 0.1, 0.2, False, 1.0, COSTS, lambda: True) == "stalls"
    assert shed_when_staged(0.5, 0.1, 0.2, False, 1.0, COSTS, lambda: False) is None
    assert shed_when_staged(0.5, 0.1, 0.2, True, 1.0, COSTS, lambda: True) is None  # no copy: no stall
    assert shed_when_staged(0.0, 0.1, 0.2, False, math.inf, FREE) is None


def test_shed_at_arrival_only_past_the_whole_slo():
    def decision(done_s: float, waited: float = 0.0) -> Decision:
        return Decision(Option("d0", "swap", "host", done_s), waited + done_s <= 0.18, 0.2, waited_s=waited)

    assert shed_at_arrival(decision(0.25))
    assert not shed_at_arrival(decision(0.19))  # misses the 0.9 margin only
    assert shed_at_arrival(decision(0.15, waited=0.1))  # time already spent counts
    assert not shed_at_arrival(None)
    assert not shed_at_arrival(Decision(None, False, 0.2))


def test_a_request_being_passed_over_is_ahead_of_no_one():
    ts = [ticket(0.2, started_at=0.0), ticket(0.5, key=1.0, due=1.0, guard=0.9, passed=True), ticket(0.1, key=2.0)]
    ahead, _, _ = work_ahead(ts, 0.0, None, 0.0)
    assert close(ahead, 0.3)  # the running one and the one not passed over
    ts[1].passed = False
    ahead, _, _ = work_ahead(ts, 0.0, None, 0.0)
    assert close(ahead, 0.8)


def test_a_probe_for_a_model_whose_own_estimate_misses_or_that_is_starved():
    i, st = PROBE_INTERVAL_S, STARVED_S
    inf = float("inf")
    assert probe(10.0, 10.0 - i, -inf, exec_s=1.0, slo_s=0.3)  # estimate over the objective, not run for i
    assert not probe(10.0, 10.0 - i / 2, -inf, exec_s=1.0, slo_s=0.3)  # ran a moment ago
    assert not probe(10.0, -inf, 10.0 - i / 2, exec_s=1.0, slo_s=0.3)  # a probe went in a moment ago
    assert probe(10.0, 10.0 - i, 10.0 - i, exec_s=1.0, slo_s=0.3)
    # hopeless only for the queue ahead (or its copy harms): not while its model runs now and then
    assert not probe(10.0, 10.0 - i, -inf, exec_s=0.1, slo_s=0.3)
    assert not probe(10.0, 10.0 - st / 2, -inf, exec_s=0.1, slo_s=0.3)
    # but a model refused for `starved` seconds gets one through, one per interval
    assert probe(10.0, 10.0 - st, -inf, exec_s=0.1, slo_s=0.3)
    assert probe(10.0, -inf, -inf, exec_s=0.1, slo_s=0.3)  # never ran
    assert not probe(10.0, -inf, 10.0 - i / 2, exec_s=0.1, slo_s=0.3)
