"""Load-request overrides (Triton's `config` and `file:` parameters of a repository load): what a
load request may write and what it may choose. Files land in a fresh folder and stay inside it;
a config may only name files inside the model's folder; code (python-backend models, `.py` files,
a `torpor.module_class` the folder's own config does not name) only with --allow-override-code."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torpor.config import ModelConfig, parameter, parse_config_json, read_config
from torpor.errors import TorporError, internal, invalid_arg

CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyw", ".pyz", ".so", ".pth")


def confined_path(rel: str, folder: Path | None = None) -> bool:
    """`rel` is a relative path that stays inside `folder` (lexically; and, where it exists,
    after resolving symlinks)."""
    if not rel or "\0" in rel:
        return False
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        return False
    if folder is None:
        return True
    try:
        return (folder / p).resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError, RuntimeError):
        return False


def drop_override(entry: Any) -> None:
    """Remove the folder a load request's `file:` contents were written to."""
    if entry.override_dir is not None:
        shutil.rmtree(entry.override_dir, ignore_errors=True)
        entry.override_dir = None

def refuse_override_code(name: str, files: dict[str, bytes], allow_code: bool) -> None:
    if allow_code:
        return
    for rel in files:
        if rel.lower().endswith(CODE_SUFFIXES):
            raise invalid_arg(
                f"failed to load '{name}', the load request carries code in 'file:{rel}'; this server refuses "
                "code in file: overrides (start it with --allow-override-code=true to allow it)"
            )

def write_override(name: str, files: dict[str, bytes]) -> Path:
    """The `file:` contents in a fresh folder, each path confined to it."""
    for rel in files:
        if not confined_path(rel):
            # the client's mistake (or an attack), not the server's: INVALID_ARG, and nothing written
            raise invalid_arg(
                f"failed to load '{name}', invalid file path 'file:{rel}' in load override: it must be a "
                "relative path inside the model's folder (no '..', no absolute path)"
            )
    root = Path(tempfile.mkdtemp(prefix=f"torpor-{name}-"))
    real_root = root.resolve()
    try:
        for rel, data in files.items():
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            # nothing in a fresh folder links out of it, but a later file may not write through
            # an earlier folder that resolves elsewhere either
            if not target.parent.resolve().is_relative_to(real_root):
                raise invalid_arg(f"invalid file path 'file:{rel}' in load override: it leaves the model's folder")
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    except (OSError, ValueError, TorporError) as e:
        shutil.rmtree(root, ignore_errors=True)
        msg = e.message if isinstance(e, TorporError) else str(e)
        raise internal(f"failed to load '{name}', failed to poll from model repository: {msg}") from None
    return root

def confine_config(name: str, config: ModelConfig, config_json: str, model_dir: Path, with_files: bool,
                   allow_code: bool) -> None:
    """A config that arrives through the load API may only name files inside the model's own
    folder, and (unless code is allowed) may not pick code to run: a python-backend model
    from `file:` contents, or a `torpor.module_class` the folder's own config does not name."""
    where = [("default_model_filename", config.default_model_filename)]
    where += [(f"label_filename of output '{o.name}'", o.label_filename) for o in config.output]
    module_class = parameter(config, "torpor.module_class") or ""
    if ".py:" in module_class:
        where.append(("torpor.module_class", module_class.rpartition(":")[0]))
    for what, rel in where:
        if rel and not confined_path(rel, model_dir):
            raise invalid_arg(f"failed to load '{name}', {what} '{rel}' must name a file inside the model's folder")
    if allow_code:
        return
    if with_files and config.backend == "python":
        raise invalid_arg(
            f"failed to load '{name}', a python-backend model's code may not arrive in file: overrides "
            "(start the server with --allow-override-code=true to allow it)"
        )
    override = parse_config_json(config_json, name)
    wanted = parameter(override, "torpor.module_class")
    if wanted:
        on_disk = read_config(model_dir) if (model_dir / "config.pbtxt").exists() else None
        if on_disk is None or parameter(on_disk, "torpor.module_class") != wanted:
            raise invalid_arg(
                f"failed to load '{name}', a load request may not choose the model's code "
                "('torpor.module_class'); start the server with --allow-override-code=true to allow it"
            )

def complete_config(override: ModelConfig, on_disk: ModelConfig) -> ModelConfig:
    """Auto-complete a `config` load override, as Triton's backends do from the model file:
    fields the override sets replace the repository's; the rest (inputs, outputs, backend,
    ...) come from the model's own config.pbtxt."""
    merged = ModelConfig()
    merged.CopyFrom(on_disk)
    for field_desc, _ in override.ListFields():
        merged.ClearField(field_desc.name)
    merged.MergeFrom(override)
    return merged
