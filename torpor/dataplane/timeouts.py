"""A request's `timeout` parameter (microseconds, as Triton's) and the waits it bounds: for a
model instance, for a worker thread's answer. The engine and its device path both use them."""

from __future__ import annotations

import asyncio
import time

from torpor.errors import unavailable
from torpor.tensors import InferRequest


def request_deadline(request: InferRequest) -> float | None:
    """time.monotonic() by which the request's `timeout` parameter wants an answer."""
    t = timeout_seconds(request)
    return None if t is None else request.arrival_ns / 1e9 + t


async def acquire_slot_by(slots: asyncio.Semaphore, deadline: float) -> None:
    """Wait for a busy instance no later than `deadline` (the caller takes a free one, or waits
    without a deadline, itself: the common case, without this frame)."""
    waiter = asyncio.ensure_future(slots.acquire())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=max(0.0, deadline - time.monotonic()))
    except asyncio.CancelledError:
        _abandon(waiter, slots)
        raise
    if not done:
        _abandon(waiter, slots)
        raise unavailable("Request timeout expired: no model instance became free within the request's timeout")


def _abandon(waiter: asyncio.Future, slots: asyncio.Semaphore) -> None:
    # a permit the abandoned wait obtained after all goes straight back
    waiter.add_done_callback(lambda f: None if f.cancelled() or f.exception() else slots.release())
    waiter.cancel()


async def wait_until(fut: asyncio.Future, deadline: float | None):
    """The worker thread's result; shielded, so neither a timeout nor a cancelled request
    cancels the future whose completion frees the model instance."""
    if deadline is None:
        return await asyncio.shield(fut)
    try:
        return await asyncio.wait_for(asyncio.shield(fut), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise unavailable("Request timeout expired: the model did not answer within the request's timeout") from None


def timeout_seconds(request: InferRequest) -> float | None:
    """The request's `timeout` parameter (microseconds, as Triton) in seconds."""
    t = request.parameters.get("timeout")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0:
        return t / 1e6
    return None
