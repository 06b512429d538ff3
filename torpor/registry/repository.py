"""Triton's model-repository layout: `<repo>/<model>/config.pbtxt` and numeric version folders.

Scanning and version selection only; loading and states live in the engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torpor.errors import invalid_arg


@dataclass(frozen=True, slots=True)
class ModelSource:
    name: str
    path: Path  # the model's folder
    repository: Path


class Repository:
    def __init__(self, paths: list[Path | str]):
        self.paths = [Path(p).resolve() for p in paths]

    def scan(self) -> tuple[dict[str, ModelSource], set[str]]:
        """Models found in every repository, and names that appear in more than one."""
        found: dict[str, ModelSource] = {}
        duplicates: set[str] = set()
        for repo in self.paths:
            if not repo.is_dir():
                continue
            for child in sorted(repo.iterdir()):
                if not child.is_dir() or child.name.startswith("."):
                    continue
                if child.name in found:
                    duplicates.add(child.name)
                    continue
                found[child.name] = ModelSource(child.name, child, repo)
        for name in duplicates:
            found.pop(name, None)
        return found, duplicates


def available_versions(model_dir: Path) -> list[int]:
    """Numeric sub-folders; names that are not numbers or start with '0' are ignored (as Triton)."""
    versions = []
    if model_dir.is_dir():
        for child in model_dir.iterdir():
            n = child.name
            if child.is_dir() and n.isdigit() and not (n.startswith("0") and n != "0"):
                versions.append(int(n))
    return sorted(versions)


def select_versions(config, available: list[int]) -> list[int]:
    """Apply the config's version_policy (latest{n} by default) to the versions on disk."""
    policy = config.version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        chosen = list(available)
    elif kind == "specific":
        wanted = {int(v) for v in policy.specific.versions}
        chosen = [v for v in available if v in wanted]
    else:
        n = policy.latest.num_versions if kind == "latest" and policy.latest.num_versions > 0 else 1
        chosen = available[-n:]
    if not chosen:
        raise invalid_arg(
            f"at least one version must be available under the version policy of model '{config.name}'"
        )
    return chosen


def read_labels(model_dir: Path, outputs: list) -> dict[str, list[str]]:
    """Each output's `label_filename` (one class label per line), where the file exists."""
    labels = {}
    for spec in outputs:
        if spec.label_filename:
            p = model_dir / spec.label_filename
            if p.exists():
                labels[spec.name] = p.read_text().splitlines()
    return labels


def folder_mtime(model_dir: Path) -> float:
    """The newest modification time of any file under a model's folder (the poll mode's change test)."""
    latest = 0.0
    for root, _, files in os.walk(model_dir):
        for f in files:
            try:
                latest = max(latest, os.stat(os.path.join(root, f)).st_mtime)
            except OSError:
                pass
    return latest
