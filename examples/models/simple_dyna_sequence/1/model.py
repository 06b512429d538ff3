"""OUTPUT = (INPUT + START + END * CORRID) * READY. Stateless: START, END, READY and CORRID
are control inputs the server's sequence batcher fills in for every request."""

import numpy as np
import triton_python_backend_utils as pb_utils


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise pb_utils.TritonModelException(f"missing input '{name}'")
    return tensor.as_numpy().astype(np.int64)


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            value = _input(request, "INPUT")
            rows = value.shape[0]
            start = _input(request, "START").reshape(rows, -1)
            end = _input(request, "END").reshape(rows, -1)
            ready = _input(request, "READY").reshape(rows, -1)
            corrid = _input(request, "CORRID").reshape(rows, -1)
            with np.errstate(over="ignore"):
                out = ((value + start + end * corrid) * ready).astype(np.int32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", out)]))
        return responses
