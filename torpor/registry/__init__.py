"""The registry: which models exist, their configs and versions, and loading them.

Holds the model repository (folders in Triton's layout), per-model state (`model_entry`),
the model-config parser and load-request overrides. Imports only torpor's common modules
(`torpor.errors`, `torpor.model`, `torpor.datatypes`, `torpor.settings`); never the data plane,
the device runtime or a front end.
"""
