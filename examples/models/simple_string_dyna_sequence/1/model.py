"""An accumulator per sequence, keyed by the string correlation id (CORRID).

For each batch row that is READY: START resets the total to INPUT, otherwise INPUT is added;
OUTPUT is the total, plus int(CORRID) when END is set (the sequence's last request), after which
the sequence's state is dropped. Rows that are not READY give 0."""

import threading

import numpy as np
import triton_python_backend_utils as pb_utils


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise pb_utils.TritonModelException(f"missing input '{name}'")
    return tensor.as_numpy()


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TritonPythonModel:
    def initialize(self, args):
        self._totals = {}
        self._lock = threading.Lock()

    def execute(self, requests):
        responses = []
        for request in requests:
            value = _input(request, "INPUT").astype(np.int64)
            rows = value.shape[0]
            start = _input(request, "START").reshape(rows)
            end = _input(request, "END").reshape(rows)
            ready = _input(request, "READY").reshape(rows)
            corrid = _input(request, "CORRID").reshape(rows)
            out = np.zeros((rows, 1), dtype=np.int32)
            try:
                with self._lock:
                    for row in range(rows):
                        if not ready[row]:
                            continue
                        key = _text(corrid[row])
                        if start[row] or key not in self._totals:
                            self._totals[key] = int(value[row, 0])
                        else:
                            self._totals[key] += int(value[row, 0])
                        result = self._totals[key]
                        if end[row]:
                            result += int(key)
                            del self._totals[key]
                        out[row, 0] = result
            except ValueError:
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(
                            "correlation ID must be decodable into an integer",
                            pb_utils.TritonError.INVALID_ARG,
                        )
                    )
                )
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", out)]))
        return responses
