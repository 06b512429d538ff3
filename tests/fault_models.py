"""Misbehaving python-backend models for the fault tests and the soak run (loadtest/soak.py):
each does one wrong thing a real model can do."""

from __future__ import annotations

from pathlib import Path

from .models import write_model

_HEAD = '''
import time
import numpy as np
import triton_python_backend_utils as pb_utils


def _x(r):
    return pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
'''

CODE = {
    # answers x * 2
    "good": _HEAD + '''
class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", _x(r) * 2)]) for r in requests]
''',
    "raises": _HEAD + '''
class TritonPythonModel:
    def execute(self, requests):
        raise ValueError("this model raises on every request")
''',
    # sleeps INPUT0 milliseconds, then answers x
    "hangs": _HEAD + '''
class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            time.sleep(float(_x(r).reshape(-1)[0]) / 1000)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", _x(r))]))
        return out
''',
    "wrong_shape": _HEAD + '''
class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", np.zeros(3, dtype=np.int32))]) for r in requests]
''',
    "wrong_dtype": _HEAD + '''
class TritonPythonModel:
    def execute(self, requests):
        bad = np.array(["not a number"], dtype=np.object_)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", bad)]) for r in requests]
''',
    "no_output": _HEAD + '''
class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([]) for r in requests]
''',
    # holds 32 MiB in the failing frame: a server that kept failed requests' tracebacks would grow
    "leaky": _HEAD + '''
class TritonPythonModel:
    def execute(self, requests):
        ballast = np.ones(8 * 1024 * 1024, dtype=np.float32)
        raise RuntimeError(f"failed holding {ballast.nbytes} bytes")
''',
    "fails_load": _HEAD + '''
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("this model cannot load")

    def execute(self, requests):
        return []
''',
}

_CONFIG = '''name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "INPUT0" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 1 ] }} ]
instance_group [ {{ count: {count} kind: KIND_CPU }} ]
'''

# one instance, two requests may wait behind it (Triton's queue policy in the config)
_QUEUED_CONFIG = '''name: "{name}"
backend: "python"
max_batch_size: 4
input [ {{ name: "INPUT0" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
dynamic_batching {{ default_queue_policy {{ max_queue_size: 2 }} }}
'''


def write_fault_models(repo: Path, names: list[str] | None = None) -> Path:
    for name in names or list(CODE):
        write_model(repo, name, _CONFIG.format(name=name, count=2 if name == "hangs" else 1), CODE[name])
    if names is None:
        write_model(repo, "queued", _QUEUED_CONFIG.format(name="queued"), CODE["hangs"])
    return repo
