"""Add and subtract integers written as decimal strings: OUTPUT0 = str(a + b),
OUTPUT1 = str(a - b), as UTF-8 bytes."""

import numpy as np
import triton_python_backend_utils as pb_utils


def _to_int(array):
    return np.array([int(x) for x in array.reshape(-1)], dtype=np.int64).reshape(array.shape)


def _to_strings(array):
    out = np.empty(array.shape, dtype=np.object_)
    out.reshape(-1)[:] = [str(int(x)).encode("utf-8") for x in array.reshape(-1)]
    return out


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                a = _to_int(pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy())
                b = _to_int(pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy())
            except ValueError as e:
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(
                            f"inputs must be decimal integers: {e}", pb_utils.TritonError.INVALID_ARG
                        )
                    )
                )
                continue
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("OUTPUT0", _to_strings(a + b)),
                        pb_utils.Tensor("OUTPUT1", _to_strings(a - b)),
                    ]
                )
            )
        return responses
