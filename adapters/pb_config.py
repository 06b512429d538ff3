"""`triton_python_backend_utils.ModelConfig`: the object a python model's `auto_complete_config`
fills in, with Triton's rules and texts for conflicts. Re-exported by
`torpor.adapters.triton_python_backend_utils`, the module models import."""

from __future__ import annotations

import json


class ModelConfig:
    """What `TritonPythonModel.auto_complete_config(auto_complete_model_config)` receives: the
    model's config as Triton's JSON dict. The model may fill in `max_batch_size`, inputs,
    outputs, dynamic batching and the transaction policy; what contradicts the config.pbtxt is
    refused with ValueError (Triton's rules and wording), which fails the load."""

    def __init__(self, model_config: dict | str):
        config = json.loads(model_config) if isinstance(model_config, str) else model_config
        config.setdefault("name", "")
        config.setdefault("max_batch_size", 0)
        config.setdefault("input", [])
        config.setdefault("output", [])
        self._model_config = config

    def as_dict(self) -> dict:
        return self._model_config

    def _name(self) -> str:
        return str(self._model_config.get("name", ""))

    def max_batch_size(self) -> int:
        return int(self._model_config.get("max_batch_size", 0))

    def set_max_batch_size(self, max_batch_size: int) -> None:
        """Raises ValueError when the config asks for a larger batch than the model allows."""
        configured = int(self._model_config.get("max_batch_size", 0))
        if configured > max_batch_size:
            raise ValueError(
                f"configuration specified max_batch_size {configured}, but in auto-complete-config "
                f"function for model '{self._name()}' specified max_batch_size {max_batch_size}"
            )
        self._model_config["max_batch_size"] = max_batch_size

    def set_dynamic_batching(self) -> None:
        """Dynamic batching, unless the config chose another scheduler (ValueError then)."""
        for other in ("sequence_batching", "ensemble_scheduling"):
            if other in self._model_config:
                raise ValueError(
                    f"Configuration specified scheduling_choice as '{other}', but auto-complete-config "
                    f"function for model '{self._name()}' tries to set scheduling_choice as "
                    "'dynamic_batching'"
                )
        self._model_config.setdefault("dynamic_batching", {})

    def set_model_transaction_policy(self, transaction_policy_dict: dict) -> None:
        for key in transaction_policy_dict:
            if key != "decoupled":
                raise ValueError(
                    "model transaction property in auto-complete-config function for model "
                    f"'{self._name()}' contains property other than 'decoupled'."
                )
        policy = self._model_config.setdefault("model_transaction_policy", {})
        if "decoupled" in transaction_policy_dict:
            wanted = transaction_policy_dict["decoupled"]
            if "decoupled" in policy and policy["decoupled"] != wanted:
                raise ValueError(
                    f"trying to change decoupled property in auto-complete-config for model "
                    f"'{self._name()}', which is already set to '{policy['decoupled']}'."
                )
            policy["decoupled"] = wanted

    def _add(self, kind: str, tensor: dict, allowed: tuple[str, ...]) -> None:
        model = self._name()
        label = tensor.get("name", "")
        for key in tensor:
            if key not in allowed:
                names = ", ".join(f"'{a}'" for a in allowed[:-1]) + f" and '{allowed[-1]}'"
                raise ValueError(
                    f"{kind} '{label}' in auto-complete-config function for model '{model}' contains "
                    f"property other than {names}."
                )
        for key in ("name", "data_type", "dims"):
            if key not in tensor:
                where = f"{kind} '{label}'" if key != "name" else kind
                raise ValueError(
                    f"{where} in auto-complete-config function for model '{model}' is missing '{key}' property."
                )
        for existing in self._model_config.setdefault(kind, []):
            if existing.get("name") != tensor["name"]:
                continue
            have_type = existing.get("data_type", "TYPE_INVALID")
            if have_type != "TYPE_INVALID" and have_type != tensor["data_type"]:
                raise ValueError(
                    f"unable to load model '{model}', configuration expects datatype {have_type} for "
                    f"{kind} '{tensor['name']}', model provides {tensor['data_type']}"
                )
            have_dims = [int(d) for d in existing.get("dims") or []]
            dims = [int(d) for d in tensor["dims"]]
            if have_dims and have_dims != dims:
                raise ValueError(
                    f"model '{model}', tensor '{tensor['name']}': the model expects dims {dims} but the "
                    f"model configuration specifies dims {have_dims}"
                )
            if "optional" in tensor and "optional" in existing and existing["optional"] != tensor["optional"]:
                raise ValueError(
                    f"model '{model}', tensor '{tensor['name']}': the model expects optional "
                    f"{tensor['optional']} but the model configuration specifies optional {existing['optional']}"
                )
            existing["data_type"] = tensor["data_type"]
            existing["dims"] = dims
            if "optional" in tensor:
                existing["optional"] = tensor["optional"]
            return
        self._model_config[kind].append(dict(tensor))

    def add_input(self, input: dict) -> None:
        """Declare an input; ValueError when the config declares it differently."""
        self._add("input", input, ("name", "data_type", "dims", "optional"))

    def add_output(self, output: dict) -> None:
        """Declare an output; ValueError when the config declares it differently."""
        self._add("output", output, ("name", "data_type", "dims"))
