"""Coverage-guided fuzzing (atheris) of the HTTP infer body parser: the JSON header plus binary
tensor extension (`torpor.api.http_codec.decode_infer_request`), and the raw/BYTES tensor decoders it
calls. A finding is any exception other than TorporError (which the front end answers with 400).

    pip install atheris
    python loadtest/fuzz_binary.py -max_total_time=60            # a 60 s run
    python loadtest/fuzz_binary.py corpus/ -max_total_time=600   # keep and grow a corpus

libFuzzer's own flags pass through. An input's first byte says whether an Inference-Header-
Content-Length is sent, the next two give it (minus 4, so it can be negative), the rest is the body. A seed corpus of valid
requests is written to a temporary folder when no corpus folder is given.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports(include=["api", "torpor"]):
    from torpor.api.http_codec import decode_infer_request

    from torpor.errors import TorporError

import numpy as np

from torpor.datatypes import to_raw


def one_input(data: bytes) -> None:
    # byte 0: whether a header length is sent; bytes 1-2: that length; the rest: the body
    if len(data) < 3:
        return
    body = data[3:]
    hlen = None if data[0] & 1 == 0 else int.from_bytes(data[1:3], "little") - 4  # may be negative or too long
    try:
        decode_infer_request(body, hlen, "m", "")
    except TorporError:
        pass


def _seed(folder: Path) -> None:
    """Valid requests to start from: JSON tensors and binary tensors of a few types."""
    samples = []
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    samples.append((None, json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": a.reshape(-1).tolist()},
        {"name": "S", "shape": [2], "datatype": "BYTES", "data": ["ab", "c"]},
        {"name": "B", "shape": [1], "datatype": "BOOL", "data": [True]}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
        "parameters": {"sequence_id": 3, "timeout": 100}}).encode()))
    for dt, arr in (("INT32", a), ("FP16", a.astype(np.float16)), ("BYTES", np.array([b"x", b"yz"], dtype=np.object_))):
        raw = to_raw(arr, dt)
        h = json.dumps({"inputs": [{"name": "I", "shape": list(arr.shape), "datatype": dt,
                                    "parameters": {"binary_data_size": len(raw)}}]}).encode()
        samples.append((len(h), h + raw))
    for i, (hlen, body) in enumerate(samples):
        prefix = b"\x00\x00\x00" if hlen is None else b"\x01" + (hlen + 4).to_bytes(2, "little")
        (folder / f"seed{i}").write_bytes(prefix + body)


def main() -> None:
    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        corpus = Path(tempfile.mkdtemp(prefix="torpor-fuzz-corpus-"))
        _seed(corpus)
        argv.append(str(corpus))
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
