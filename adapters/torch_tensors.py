"""numpy <-> torch for model inputs and outputs, including the datatypes numpy and torch
spell differently (BF16 travels as an int16 view; BYTES has no torch form)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

from torpor.datatypes import numpy_dtype
from torpor.errors import invalid_arg

_BF16 = np.dtype(ml_dtypes.bfloat16)


def to_torch(array: np.ndarray, name: str = "") -> torch.Tensor:
    """A CPU tensor sharing memory with `array` where possible. Read-only arrays (views of a
    request body) are copied, since a model may write into its inputs."""
    if array.dtype == np.object_:
        raise invalid_arg(f"input '{name}': BYTES tensors cannot be passed to a PyTorch model")
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, order="C", copy=True)
    if array.dtype == _BF16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def to_numpy(tensor: torch.Tensor, datatype: str | None = None) -> np.ndarray:
    """A numpy array of the tensor's values, cast to the config's `datatype` when it differs."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.dtype == torch.bfloat16:
        array = tensor.contiguous().view(torch.int16).numpy().view(_BF16)
    else:
        array = tensor.numpy()
    if datatype is not None and datatype != "BYTES":
        want = numpy_dtype(datatype)
        if array.dtype != want:
            array = array.astype(want)
    return array
