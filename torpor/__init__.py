"""Torpor: a KServe v2 / Triton inference server for many models on few GPUs.

The package shows the architecture: `registry` (models and their lifecycle), `dataplane` (one
request from front end to answer), `runtime` (devices, memory, copies, runs), `scheduling`
(pure policy, shared with the simulator), `sim` (the simulator), and the common vocabulary at
the top (errors, tensors, datatypes, the model-function contract, model configs). The front ends
(`torpor.api`, from the source tree's api/) and model formats (`torpor.adapters`, from adapters/)
sit above the data plane; `torpor.cli` composes them. tests/unit/test_layering.py checks who may
import whom.
"""

__version__ = "0.1.0"
