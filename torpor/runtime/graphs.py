"""CUDA graphs for resident models: the decisions around them. Pure logic, no CUDA.

A graph replays a recorded run's kernels with one launch, which is what a launch-bound model at
batch 1 (ResNet-50 eager: about 160 launches from Python) needs on a GPU. The capture and replay
themselves need a GPU and are not built yet (issue 21); what decides around them is here and
tested on CPU, so that the device runtime only has to call it.

**Buckets.** A graph has fixed shapes, so a batched model captures a few batch sizes
(`capture_sizes`: the model's `preferred_batch_size` where it has them, else powers of two, always
1 and `max_batch_size`, at most `MAX_SIZES` of them) and a batch of n rows runs at the smallest of
them that holds it (`bucket_for`), padded. Dynamic batching closes a batch at the largest
preferred size, so with `capture_sizes` taking those sizes a full batch needs no padding. A model
without a batch dimension (`max_batch_size` 0) has one size, 0.

**When a graph may replay** (`GraphBook`, one per model and device):
- It reads the addresses it was captured on: the weights where the model sat in the arena, and
  the book's static input and output buffers. So a graph is valid only for the placement it was
  captured at (`DeviceClone.bound_to`: the arena and the group offsets); a model copied in at
  other offsets captures again at its next run of that bucket (`recaptures`), and one that comes
  back to its old blocks (`DeviceMemory`, same place on return) replays.
- Inputs whose shape beyond the batch dimension differs from what a bucket was captured with
  (dynamic shapes) get a graph of their own, up to `max_graphs` per model (each holds memory for
  its buffers and its pool); beyond that they run eager.
- A bucket is captured on its `warm`-th run, not its first: the first eager runs of a shape fill
  the caching allocator and autotuning, which must not happen inside a capture.
- A capture that fails (a host sync, an op that cannot be captured, a dynamic shape inside the
  model) turns the model eager on that device for good, with one log line saying why: a failed
  capture costs a run and may leave the stream in error, so it is not retried.

**The cost model** learns execution time per (model, batch size) (`costmodel.ExecEstimator`); a
run is timed at the batch size it computed, `RunPlan.rows` (a graph's bucket, padding included),
and a request's estimate is asked for at the bucket its batch would run at.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

MAX_SIZES = 8  # graphs per model at most by default: each keeps static buffers and a memory pool


def capture_sizes(max_batch_size: int, preferred: Iterable[int] = (), limit: int = MAX_SIZES) -> tuple[int, ...]:
    """The batch sizes to capture graphs for (ascending). `max_batch_size` 0 (no batch
    dimension): (0,). Preferred sizes (Triton's `preferred_batch_size`) where given, else powers of
    two; always 1 and `max_batch_size`; past `limit` sizes, the largest powers go first."""
    if max_batch_size < 0 or limit < 2:
        raise ValueError(f"max_batch_size must be >= 0 and limit >= 2, got {max_batch_size}, {limit}")
    if max_batch_size == 0:
        return (0,)
    wanted = {p for p in preferred if 0 < p <= max_batch_size}
    if not wanted:
        p = 1
        while p < max_batch_size:
            wanted.add(p)
            p *= 2
    wanted |= {1, max_batch_size}
    sizes = sorted(wanted)
    while len(sizes) > limit:  # keep 1 and the largest; drop the largest of the rest
        del sizes[-2]
    return tuple(sizes)


def bucket_for(rows: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest size that holds `rows` (the batch is padded to it); None past the largest."""
    if sizes == (0,):
        return 0
    for s in sizes:
        if s >= rows:
            return s
    return None


@dataclass(frozen=True, slots=True)
class RunPlan:
    """How one run executes: `replay` a captured graph, `capture` one (then replay it), or
    `eager`. `rows` is the batch size the run computes (padded up to its bucket for a graph)."""

    mode: str
    rows: int
    reason: str = ""  # why eager


@dataclass(slots=True)
class GraphCounters:
    captures: int = 0
    recaptures: int = 0  # captures of a bucket that had a graph at an earlier placement
    replays: int = 0
    eager: int = 0
    padded_rows: int = 0  # rows computed only to fill a bucket


class GraphBook:
    """The graphs of one model on one device (see the module docstring). Graph objects are
    opaque here: whatever the device runtime's capture returns (a CUDA graph with its buffers)."""

    def __init__(self, name: str, sizes: tuple[int, ...], *, warm: int = 2, max_graphs: int = MAX_SIZES,
                 log: Callable[[str], None] | None = None):
        self.name = name
        self.sizes = sizes
        self.warm = warm
        self.max_graphs = max_graphs
        self.log = log or (lambda _msg: None)
        self.placement: Any = None  # where the graphs held now were captured
        self.graphs: dict[tuple[int, tuple], Any] = {}  # (bucket, shape beyond the batch) -> graph
        self.seen: dict[tuple[int, tuple], int] = {}  # eager runs per key, towards `warm`
        self.ever: set[tuple[int, tuple]] = set()  # keys captured at some placement
        self.eager_reason = ""  # set once: the model runs eager on this device for good
        self.counters = GraphCounters()

    def plan(self, rows: int, shape: tuple, placement: Any) -> RunPlan:
        """How a run of `rows` rows whose inputs have `shape` beyond the batch dimension executes
        with the model at `placement`."""
        if placement != self.placement:
            # Rule: a graph replays reads of the weights' addresses at capture; after a move, none is valid.
            self.graphs.clear()
            self.placement = placement
        if self.eager_reason:
            return self._eager(rows, self.eager_reason)
        bucket = bucket_for(rows, self.sizes)
        if bucket is None:
            return self._eager(rows, f"batch of {rows} above the largest captured size {self.sizes[-1]}")
        key = (bucket, tuple(shape))
        if key in self.graphs:
            self.counters.replays += 1
            self.counters.padded_rows += bucket - rows
            return RunPlan("replay", bucket)
        if len(self.graphs) >= self.max_graphs:
            return self._eager(rows, f"{self.max_graphs} graphs held already (input shapes vary)")
        seen = self.seen.get(key, 0) + 1
        self.seen[key] = seen
        if seen < self.warm:
            return self._eager(rows, "warming up")
        self.counters.padded_rows += bucket - rows
        return RunPlan("capture", bucket)

    def captured(self, plan: RunPlan, shape: tuple, placement: Any, graph: Any) -> bool:
        """A `capture` plan's graph, recorded at `placement`; False (not kept) if the model moved
        meanwhile: the graph reads the old addresses."""
        if plan.mode != "capture" or placement != self.placement or self.eager_reason:
            return False
        key = (plan.rows, tuple(shape))
        self.counters.captures += 1
        if key in self.ever:
            self.counters.recaptures += 1
        self.ever.add(key)
        self.graphs[key] = graph
        return True

    def failed(self, error: BaseException) -> None:
        """A capture raised: eager from now on, said once."""
        if self.eager_reason:
            return
        self.eager_reason = f"graph capture failed: {type(error).__name__}: {error}"
        self.graphs.clear()
        self.log(f"model '{self.name}' runs eager: {self.eager_reason}")

    def _eager(self, rows: int, reason: str) -> RunPlan:
        self.counters.eager += 1
        return RunPlan("eager", rows, reason)

