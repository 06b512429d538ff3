"""config.pbtxt: parse into tritonclient's ModelConfig message, derive tensor specs, and print
it as JSON the way Triton does (snake_case, every primitive field, int64s as numbers)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from google.protobuf import json_format, text_format

from torpor.datatypes import CONFIG_TO_TRITON
from torpor.errors import invalid_arg
from torpor.model import TensorSpec


def _model_config_pb2() -> ModuleType:
    """tritonclient's generated ModelConfig message, without importing `tritonclient.grpc`:
    that package's __init__ loads grpc and the whole gRPC client, which the engine must not
    need. The module is loaded from its file under its own name, so the gRPC front end's
    later `import tritonclient.grpc` finds it in sys.modules and registers nothing twice."""
    name = "tritonclient.grpc.model_config_pb2"
    if name in sys.modules:
        return sys.modules[name]
    root = importlib.util.find_spec("tritonclient")
    if root is None or not root.submodule_search_locations:
        raise ImportError("tritonclient is not installed (it provides Triton's ModelConfig message)")
    path = Path(next(iter(root.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


model_config_pb2 = _model_config_pb2()
ModelConfig = model_config_pb2.ModelConfig


def parse_config_text(text: str, name: str | None = None) -> ModelConfig:
    config = ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise invalid_arg(f"failed to parse config.pbtxt: {e}") from None
    if name is not None and not config.name:
        config.name = name
    return config


def read_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.pbtxt"
    if not path.exists():
        raise invalid_arg(f"model '{model_dir.name}' has no config.pbtxt")
    return parse_config_text(path.read_text(), model_dir.name)


def parse_config_json(text: str, name: str) -> ModelConfig:
    """A `config` load override: JSON by protobuf rules (ints may be strings)."""
    config = ModelConfig()
    try:
        json_format.Parse(text, config)
    except (json_format.ParseError, ValueError) as e:
        raise invalid_arg(f"failed to parse model config override: {e}") from None
    if not config.name:
        config.name = name
    return config


def datatype_name(enum_value: int) -> str:
    return CONFIG_TO_TRITON.get(model_config_pb2.DataType.Name(enum_value), "INVALID")


def tensor_specs(config: ModelConfig) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inputs = [
        TensorSpec(
            name=i.name,
            datatype=datatype_name(i.data_type),
            dims=tuple(int(d) for d in i.dims),
            optional=i.optional,
            reshape=tuple(int(d) for d in i.reshape.shape) if i.HasField("reshape") else None,
        )
        for i in config.input
    ]
    outputs = [
        TensorSpec(
            name=o.name,
            datatype=datatype_name(o.data_type),
            dims=tuple(int(d) for d in o.dims),
            reshape=tuple(int(d) for d in o.reshape.shape) if o.HasField("reshape") else None,
            label_filename=o.label_filename,
        )
        for o in config.output
    ]
    return inputs, outputs


def sequence_controls(config: ModelConfig) -> dict[str, tuple[str, object, str]]:
    """The sequence batcher's control inputs: name -> (kind, (false, true) values, datatype)."""
    if not config.HasField("sequence_batching"):
        return {}
    out = {}
    for ci in config.sequence_batching.control_input:
        for c in ci.control:
            kind = type(c).Kind.Name(c.kind)
            if c.int32_false_true:
                vals, dt = tuple(c.int32_false_true), "INT32"
            elif c.fp32_false_true:
                vals, dt = tuple(c.fp32_false_true), "FP32"
            elif c.bool_false_true:
                vals, dt = tuple(c.bool_false_true), "BOOL"
            else:
                vals, dt = None, datatype_name(c.data_type) if c.data_type else "UINT64"
            out[ci.name] = (kind, vals, dt)
    return out


def parameter(config: ModelConfig, key: str, default: str | None = None) -> str | None:
    """A config `parameters { key: ... value: { string_value: ... } }` entry."""
    if key in config.parameters:
        return config.parameters[key].string_value
    return default


# int64 fields protobuf's JSON printer renders as strings; Triton turns them back into numbers.
_INT64_KEYS = {
    "dims",
    "shape",
    "versions",
    "max_queue_delay_microseconds",
    "default_queue_timeout_microseconds",
    "max_sequence_idle_microseconds",
    "default_timeout_microseconds",
    "timeout_microseconds",
    "model_version",
    "preferred_batch_size",
    "max_candidate_sequences",
    "max_queue_size",
    "priority_levels",
    "default_priority_level",
    "int64_false_true",
    "max_batch_size",
    "count",
    "gpus",
    "secondary_devices",
    "device_id",
    "memory_usage",
}


def _numberify(value, key: str | None = None):
    if isinstance(value, dict):
        return {k: _numberify(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_numberify(v, key) for v in value]
    if isinstance(value, str) and key in _INT64_KEYS:
        try:
            return int(value)
        except ValueError:
            return value
    return value


def config_to_dict(config: ModelConfig) -> dict:
    d = json_format.MessageToDict(
        config,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    return _numberify(d)


# The sequence batcher's idle timeout when the config leaves it at 0 (Triton's default, 1 s);
# shown for Triton's clients only: Torpor keeps a sequence until its END request.
_SEQUENCE_IDLE_DEFAULT_US = 1_000_000


def normalize_config(config: ModelConfig) -> ModelConfig:
    """A copy of `config` with the defaults Triton fills in at load, so that a client reading
    the model config over HTTP or gRPC sees what it would see from Triton (checked field by field
    against tritonserver 2.51's, tests/server/test_autocomplete.py). Triton does this whether or
    not `--strict-model-config` is on: strictness only stops the backend's auto-complete (a
    python model's `auto_complete_config`, a folder without config.pbtxt), not these defaults.

    - `version_policy`: latest 1; `optimization`: pinned input and output memory on;
    - the backend fields: a python model's file is `model.py`; TorchScript is backend `pytorch`,
      platform `pytorch_libtorch`, file `model.pt`; a PyTorch eager model (Torpor's own format)
      keeps its empty platform and names `model.safetensors`;
    - `instance_group`: none -> one group named after the model, count 1; a group without a
      name is `<model>_<index>`, count 0 is 1, KIND_AUTO is KIND_GPU when the group lists GPUs
      and KIND_CPU otherwise. Torpor reports KIND_CPU where Triton on a GPU host would say
      KIND_GPU: its python instances run on the CPU, and a torch model's device is chosen per
      request by late binding, not by its instance group;
    - batching: an empty `preferred_batch_size` (dynamic batching, or the sequence batcher's
      `oldest` strategy) becomes [max_batch_size]; a sequence idle timeout of 0 becomes 1 s.
    """
    out = ModelConfig()
    out.CopyFrom(config)
    _backend_fields(out)
    if not out.HasField("version_policy"):
        out.version_policy.latest.num_versions = 1
    optimization = out.optimization  # present from here on, as in Triton's answers
    for pinned in ("input_pinned_memory", "output_pinned_memory"):
        if not optimization.HasField(pinned):  # `{ enable: false }` is present, and stays false
            getattr(optimization, pinned).enable = True
    if out.max_batch_size > 0:
        if out.HasField("dynamic_batching") and not out.dynamic_batching.preferred_batch_size:
            out.dynamic_batching.preferred_batch_size.append(out.max_batch_size)
        oldest = out.sequence_batching.oldest if out.sequence_batching.HasField("oldest") else None
        if oldest is not None and not oldest.preferred_batch_size:
            oldest.preferred_batch_size.append(out.max_batch_size)
    if out.HasField("sequence_batching") and out.sequence_batching.max_sequence_idle_microseconds == 0:
        out.sequence_batching.max_sequence_idle_microseconds = _SEQUENCE_IDLE_DEFAULT_US
    _instance_groups(out)
    return out


def _backend_fields(config: ModelConfig) -> None:
    eager = parameter(config, "torpor.module_class") is not None  # torpor.adapters.MODULE_CLASS
    if config.platform == "pytorch_libtorch" and not config.backend:
        config.backend = "pytorch"
    if config.backend == "pytorch" and not eager and not config.platform:
        config.platform = "pytorch_libtorch"
    if config.default_model_filename:
        return
    if config.backend == "python":
        config.default_model_filename = "model.py"
    elif config.backend == "pytorch":
        config.default_model_filename = "model.safetensors" if eager else "model.pt"


def _instance_groups(config: ModelConfig) -> None:
    group_type = model_config_pb2.ModelInstanceGroup
    if not config.instance_group:
        config.instance_group.add(name=config.name, kind=group_type.KIND_CPU, count=1)
        return
    for index, group in enumerate(config.instance_group):
        if not group.name:
            group.name = f"{config.name}_{index}"
        if group.kind == group_type.KIND_AUTO:
            group.kind = group_type.KIND_GPU if group.gpus else group_type.KIND_CPU
        group.count = max(group.count, 1)
