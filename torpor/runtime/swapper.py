"""The swapper: issue a resident's group copies, all at once, in order, one event per group.

Host -> device (`swap_in_from_host`): group g of the host slab (pinned on CUDA) is copied into
its preallocated arena range with one `copy_(non_blocking=True)` on the device's copy stream,
followed by an event. All groups are enqueued before the call returns; nothing waits, nothing
is allocated. The executor makes compute wait on group g's event only where group g is first
used, so compute on early groups overlaps the copy of later ones.

Device -> device (`swap_in_from_peer`): the same, reading from another device's resident of the
model (NVLink/P2P between GPUs, or two arenas on one GPU; a plain copy between CPU virtual
devices). The source may itself still be arriving: each group's copy waits for the source's
event of that group. The source must not be evicted while the copy reads it: the copy's last
event is added to the source's `readers`, and `DeviceMemory` never evicts a resident with
unfinished readers.

Copies on one copy stream run in issue order, so group g's event completing implies every
earlier group has landed too; the executor relies on this (a watermark per run).
"""

from __future__ import annotations

from torpor.runtime.devices import CopyBatch
from torpor.runtime.memory import Resident


def swap_in_from_host(r: Resident) -> CopyBatch:
    model = r.model
    # Rule: the destination blocks were released only after all earlier readers and writers of
    # them finished (DeviceMemory.release), so the copy stream needs no wait before writing.
    jobs = [(r.group_view(g.index), model.group_bytes(g), None) for g in model.groups]
    r.batch = r.device.issue_copies(jobs)
    r.source = "host"
    return r.batch


def swap_in_from_peer(r: Resident, src: Resident) -> CopyBatch:
    if src.model is not r.model:
        raise ValueError("peer copy between residents of different models")
    pending = not src.copy_done()
    # Rule: while the source is still arriving, copy group g only after the source's group-g
    # event (the copy stream waits on it; the host does not).
    jobs = [
        (r.group_view(i), src.group_view(i), src.events[i] if pending else None)
        for i in range(len(r.model.groups))
    ]
    r.batch = r.device.issue_copies(jobs, src_device=src.device)
    r.source = f"peer:{src.device.name}"
    if r.batch.events:
        # Rule: the source's blocks are read until this batch's last event; it is not evicted before.
        src.readers.append(r.batch.events[-1])
    return r.batch
