"""Trace and logging settings, held and returned as Triton does (no tracer is attached yet:
the values are stored faithfully so tools that set and read them work)."""

from __future__ import annotations

import logging
from typing import Any

from torpor.errors import invalid_arg, unsupported

_TRACE_LEVELS = {"OFF", "TIMESTAMPS", "TENSORS"}
_TRACE_KEYS = ("trace_level", "trace_rate", "trace_count", "log_frequency", "trace_file", "trace_mode")


class TraceSettings:
    def __init__(self):
        self.global_settings: dict[str, Any] = {
            "trace_level": ["OFF"],
            "trace_rate": "1000",
            "trace_count": "-1",
            "log_frequency": "0",
            "trace_file": "",
            "trace_mode": "triton",
        }
        self.model_overrides: dict[str, dict[str, Any]] = {}

    def get(self, model: str = "") -> dict:
        out = dict(self.global_settings)
        out.update(self.model_overrides.get(model, {}) if model else {})
        out["trace_level"] = list(out["trace_level"])
        return out

    def update(self, changes: dict[str, Any], model: str = "") -> dict:
        """Apply `changes` (a value of None clears a model-level override)."""
        target = self.model_overrides.setdefault(model, {}) if model else self.global_settings
        normalized = {}
        for key, value in changes.items():
            if key not in _TRACE_KEYS:
                raise invalid_arg(f"unknown trace setting '{key}'")
            if key == "trace_file" and value is not None:
                raise unsupported("trace file location can not be updated through network protocol")
            if value is None:
                normalized[key] = None
                continue
            if key == "trace_level":
                levels = value if isinstance(value, list) else [value]
                levels = [str(v).upper() for v in levels]
                bad = [v for v in levels if v not in _TRACE_LEVELS]
                if bad:
                    raise invalid_arg(f"invalid trace level '{bad[0]}'")
                normalized[key] = levels
            else:
                if isinstance(value, list):
                    if len(value) != 1:
                        raise invalid_arg(f"expect only 1 value for trace setting '{key}'")
                    value = value[0]
                s = str(value)
                if key in ("trace_rate", "trace_count", "log_frequency"):
                    try:
                        n = int(s)
                    except ValueError:
                        raise invalid_arg(f"invalid value '{s}' for trace setting '{key}'") from None
                    if key != "trace_count" and n < 0:
                        raise invalid_arg(f"invalid value '{s}' for trace setting '{key}'")
                normalized[key] = s
        for key, value in normalized.items():
            if value is None:
                if model:
                    target.pop(key, None)
            else:
                target[key] = value
        return self.get(model)


class LogSettings:
    def __init__(self, verbose: int = 0):
        self.values: dict[str, Any] = {
            "log_file": "",
            "log_info": True,
            "log_warning": True,
            "log_error": True,
            "log_verbose_level": verbose,
            "log_format": "default",
        }
        self._apply()

    def get(self) -> dict:
        return dict(self.values)

    def update(self, changes: dict[str, Any]) -> dict:
        new = dict(self.values)
        for key, value in changes.items():
            if key not in self.values:
                raise invalid_arg(f"Logging setting '{key}' is not supported")
            if key == "log_file":
                if value not in (None, self.values["log_file"]):
                    raise unsupported("log file location can not be updated through network protocol")
                continue
            if key in ("log_info", "log_warning", "log_error"):
                if not isinstance(value, bool):
                    raise invalid_arg(f"expect boolean for '{key}'")
            elif key == "log_verbose_level":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise invalid_arg(f"expect unsigned integer for '{key}'")
            elif key == "log_format":
                if value not in ("default", "ISO8601"):
                    raise invalid_arg(f"invalid log format '{value}'")
            new[key] = value
        self.values = new
        self._apply()
        return self.get()

    def _apply(self) -> None:
        logger = logging.getLogger("torpor")
        if self.values["log_verbose_level"] > 0:
            logger.setLevel(logging.DEBUG)
        elif self.values["log_info"]:
            logger.setLevel(logging.INFO)
        elif self.values["log_warning"]:
            logger.setLevel(logging.WARNING)
        else:
            logger.setLevel(logging.ERROR)


