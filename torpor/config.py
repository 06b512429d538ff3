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
