"""Triton's restricted APIs: `--http-restricted-api` / `--grpc-restricted-protocol`.

A spec is `<group>[,<group>...]:<key>=<value>`, repeatable; a request to an API of a listed group
must carry the header `<key>` (HTTP) or the metadata `triton-grpc-protocol-<key>` (gRPC) with that
exact value. A group may appear in one spec only, as in tritonserver. The front ends map each of
their endpoints to a group and answer a refusal in their own shape.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

GROUPS = (
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)

GRPC_HEADER_PREFIX = "triton-grpc-protocol-"


@dataclass(frozen=True)
class Restriction:
    header: str  # lower case: HTTP header names are case-insensitive, gRPC metadata keys are lower case
    value: str

    def allows(self, presented: str | None) -> bool:
        # constant-time, so the comparison does not leak how much of a guessed key was right
        return presented is not None and hmac.compare_digest(presented.encode(), self.value.encode())


def parse_restrictions(specs: list[str] | None, option: str, header_prefix: str = "") -> dict[str, Restriction]:
    """{group: Restriction}; ValueError in tritonserver's words (launch scripts and tests match
    them), "api" for --http-restricted-api, "protocol" for --grpc-restricted-protocol."""
    kind = "protocol" if option.endswith("-protocol") else "api"
    out: dict[str, Restriction] = {}
    for spec in specs or []:
        groups_text, sep, pair = spec.partition(":")
        key, eq, value = pair.partition("=")
        if not sep or not eq or not groups_text.strip() or not key.strip() or not value:
            raise ValueError(f"{option} option format is '<config name>:<setting>=<value>'. Got {spec} "
                             f"(expected <group>[,<group>...]:<key>=<value>, groups among {', '.join(GROUPS)})")
        header = (header_prefix + key.strip()).lower()
        for g in groups_text.split(","):
            g = g.strip()
            if g not in GROUPS:
                raise ValueError(f"unknown restricted {kind} '{g}' (known: {', '.join(GROUPS)}; {option})")
            if g in out:
                raise ValueError(f"restricted {kind} '{g}' can not be specified in multiple config groups ({option})")
            out[g] = Restriction(header, value)
    return out
