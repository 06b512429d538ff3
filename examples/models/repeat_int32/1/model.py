"""Decoupled: for a request with IN = [v0, v1, ...], send one response per element
(OUT = [vi], IDX = [i]), sleeping DELAY[i] ms before each, then WAIT ms later close the request
with the final flag and no response. The responses are sent from a thread the model starts,
so `execute` returns at once, as Triton's decoupled examples do."""

import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


def _values(request, name, dtype):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return np.zeros(0, dtype=dtype)
    return tensor.as_numpy().reshape(-1).astype(dtype)


class TritonPythonModel:
    def initialize(self, args):
        self._inflight = 0
        self._idle = threading.Condition()

    def execute(self, requests):
        for request in requests:
            with self._idle:
                self._inflight += 1
            thread = threading.Thread(target=self._respond, args=(request,), daemon=True)
            thread.start()
        # Decoupled: execute returns None; the responses go through each request's sender.

    def _respond(self, request):
        sender = request.get_response_sender()
        try:
            values = _values(request, "IN", np.int32)
            delays = _values(request, "DELAY", np.uint32)
            wait = _values(request, "WAIT", np.uint32)
            for i, value in enumerate(values):
                if sender.is_cancelled():
                    break
                if i < len(delays) and delays[i]:
                    time.sleep(int(delays[i]) / 1000.0)
                sender.send(
                    pb_utils.InferenceResponse(
                        output_tensors=[
                            pb_utils.Tensor("OUT", np.array([value], dtype=np.int32)),
                            pb_utils.Tensor("IDX", np.array([i], dtype=np.uint32)),
                        ]
                    )
                )
            if len(wait) and wait[0]:
                time.sleep(int(wait[0]) / 1000.0)
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as e:  # noqa: BLE001 - never leave the request open
            try:
                sender.send(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
            except pb_utils.TritonModelException:
                pass
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def finalize(self):
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0, timeout=30)
