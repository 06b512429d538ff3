"""Logging settings, held and returned as Triton does (the trace settings are
torpor.tracing's)."""

from __future__ import annotations

import logging
from typing import Any

from torpor.errors import invalid_arg, unsupported


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
            elif key == "log_format" and value not in ("default", "ISO8601"):
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


