"""Inference through Ray: `ClusterClient` over a DeploymentHandle of the Torpor node deployment.

A handle call `handle.infer.remote(model, request)` is routed by router.TorporRouter and
answered by the node's engine (ray_node.TorporNode.infer). What a handle alone does not do is
answer a request whose node died under it: Serve drops the dead replica from the router, but
the call in flight fails with Ray's actor error. The client sends such a request again, to the
nodes still up; inference is a pure function of the request (Torpor keeps no state between
requests but a sequence model's, and those are not retried), so a second run gives the answer
the first would have. A node's own answer, an error included (UNAVAILABLE when it sheds a
request it cannot serve in time), is returned as it is, never retried.

Imports Ray when a client is made."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from torpor.errors import unavailable
from torpor.tensors import InferRequest, InferResponse

log = logging.getLogger("torpor")


def _node_gone_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError

    # RayActorError covers ActorDiedError (the replica is gone) and ActorUnavailableError
    # (unreachable: it may have run the request or not, and running it twice is harmless)
    return (RayActorError, NodeDiedError, WorkerCrashedError)


class ClusterClient:
    """infer(model, request) on whichever node the router picks, sent again where that node
    died before answering (at most `attempts` sends; `backoff_s` between them, doubling, for
    the router to learn the replica is gone)."""

    def __init__(self, handle: Any, attempts: int = 4, backoff_s: float = 0.05):
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self.handle = handle
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.resent = 0  # requests sent again because their node died
        self._gone = _node_gone_errors()

    async def infer(self, model: str, request: InferRequest | Mapping[str, np.ndarray]) -> InferResponse:
        last: BaseException | None = None
        # a sequence's requests change its state on the node: never sent twice
        attempts = 1 if isinstance(request, InferRequest) and request.parameters.get("sequence_id") else self.attempts
        for attempt in range(attempts):
            if attempt:
                self.resent += 1
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return await self.handle.infer.remote(model, request)
            except self._gone as e:
                log.info("a node died under a request for %s (%s); sending it again", model, type(e).__name__)
                last = e
        raise unavailable(f"no node answered a request for model '{model}' in {attempts} attempt(s): "
                          f"{type(last).__name__}")
