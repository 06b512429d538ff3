"""OUTPUT = (INPUT + START) * READY. Stateless: START and READY are control inputs the
server's sequence batcher fills in for every request."""

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
            start = _input(request, "START").reshape(value.shape[0], -1)
            ready = _input(request, "READY").reshape(value.shape[0], -1)
            out = ((value + start) * ready).astype(np.int32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", out)]))
        return responses
