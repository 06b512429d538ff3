"""Test-only models written into temporary repositories (python-backend `model.py` files)."""

from __future__ import annotations

from pathlib import Path

IDENTITY_MODEL = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x)]))
        return out
'''

# Echoes the request's custom parameters back as a JSON string, to check the parameters path.
PARAMS_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            p = np.array([r.parameters().encode()], dtype=np.object_)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", p)]))
        return out
'''

CLASSIFIER_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x.astype(np.float32) * 1.5)]))
        return out
'''

FAILING_MODEL = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        raise pb_utils.TritonModelException("this model always fails")
'''

ALL_DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                 "FP16", "BF16", "FP32", "FP64", "BYTES"]


def _config_type(dt: str) -> str:
    return "TYPE_STRING" if dt == "BYTES" else f"TYPE_{dt}"


def write_model(repo: Path, name: str, config: str, code: str, files: dict[str, str] | None = None) -> Path:
    d = repo / name
    (d / "1").mkdir(parents=True, exist_ok=True)
    (d / "config.pbtxt").write_text(config)
    (d / "1" / "model.py").write_text(code)
    for rel, text in (files or {}).items():
        (d / rel).write_text(text)
    return d


def identity_config(name: str, dt: str) -> str:
    t = _config_type(dt)
    return f'''name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "INPUT0" data_type: {t} dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: {t} dims: [ -1 ] }} ]
'''


def write_test_models(repo: Path) -> Path:
    """identity_<dt> for every datatype, `params`, `classifier` and `failing`."""
    for dt in ALL_DATATYPES:
        name = f"identity_{dt.lower()}"
        write_model(repo, name, identity_config(name, dt), IDENTITY_MODEL)
    write_model(
        repo,
        "params",
        '''name: "params"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_STRING dims: [ 1 ] } ]
''',
        PARAMS_MODEL,
    )
    write_model(
        repo,
        "classifier",
        '''name: "classifier"
backend: "python"
max_batch_size: 4
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 5 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 5 ] label_filename: "labels.txt" } ]
''',
        CLASSIFIER_MODEL,
        {"labels.txt": "cat\ndog\nbird\nfish\nfrog\n"},
    )
    write_model(
        repo,
        "failing",
        '''name: "failing"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 1 ] } ]
''',
        FAILING_MODEL,
    )
    return repo


def write_mlps(repo: Path, names: list[str], first_seed: int, hidden: int) -> Path:
    """A repository of generated-weights MLPs (`mlp_config`), the i-th seeded `first_seed + i`."""
    for i, name in enumerate(names):
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        (repo / name / "config.pbtxt").write_text(mlp_config(name, first_seed + i, hidden))
    return repo


def mlp_config(name: str, seed: int, hidden: int) -> str:
    """A generated-weights PyTorch MLP (`torpor.adapters.networks:WideMLP`, 4 layers of `hidden`)."""
    return f'''name: "{name}"
backend: "pytorch"
max_batch_size: 4
input [ {{ name: "input" data_type: TYPE_FP32 dims: [ {hidden} ] }} ]
output [ {{ name: "output" data_type: TYPE_FP32 dims: [ {hidden} ] }} ]
parameters {{ key: "torpor.module_class" value: {{ string_value: "torpor.adapters.networks:WideMLP" }} }}
parameters {{ key: "torpor.module_kwargs" value: {{ string_value: "{{\\"hidden\\": {hidden}, \\"layers\\": 4}}" }} }}
parameters {{ key: "torpor.generate_weights" value: {{ string_value: "{seed}" }} }}
'''
