"""Errors with Triton's status codes, so each front end can map them to its own shape."""

from __future__ import annotations

import enum


class Status(enum.Enum):
    # Triton's TRITONSERVER_Error codes; the front ends map them (HTTP status, gRPC code).
    INVALID_ARG = "INVALID_ARG"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"
    UNSUPPORTED = "UNSUPPORTED"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    UNKNOWN = "UNKNOWN"
    CANCELLED = "CANCELLED"


class TorporError(Exception):
    """An error a client should see: a status and Triton's message text."""

    def __init__(self, status: Status, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def __repr__(self) -> str:
        return f"TorporError({self.status.value}, {self.message!r})"


def invalid_arg(message: str) -> TorporError:
    return TorporError(Status.INVALID_ARG, message)


def not_found(message: str) -> TorporError:
    return TorporError(Status.NOT_FOUND, message)


def unavailable(message: str) -> TorporError:
    return TorporError(Status.UNAVAILABLE, message)


def internal(message: str) -> TorporError:
    return TorporError(Status.INTERNAL, message)


def unsupported(message: str) -> TorporError:
    return TorporError(Status.UNSUPPORTED, message)


def already_exists(message: str) -> TorporError:
    return TorporError(Status.ALREADY_EXISTS, message)
