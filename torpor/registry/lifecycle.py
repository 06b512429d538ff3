"""A model's lifecycle: the models the server knows, loading, reloading, unloading, polling.

`ModelRegistry` owns the table of models (`ModelEntry` per name, `VersionEntry` per loaded
version), the repository scan, Triton's load rules (a reload keeps serving the old versions until
the new ones are ready; `file:` overrides; explicit vs poll mode) and readiness. Model functions
come from an injected factory (the adapters) and run their `load` / `unload` on the data plane's
worker threads. Where a version's weights are bound to devices is the device runtime's business:
the registry hands each loaded function to a `Binder` (`bind` returns the key the runtime knows
it by, or None where it runs where it was loaded) and gives the key back on unload.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from torpor.config import ModelConfig, config_to_dict, parameter, parse_config_json, read_config
from torpor.errors import Status, TorporError, internal, invalid_arg, unavailable
from torpor.logs import reason
from torpor.model import ModelFunction
from torpor.registry.model_entry import ModelEntry, VersionEntry
from torpor.registry.overrides import (
    complete_config,
    confine_config,
    drop_override,
    refuse_override_code,
    write_override,
)
from torpor.registry.repository import (
    Repository,
    available_versions,
    folder_mtime,
    read_labels,
    select_versions,
)
from torpor.scheduling.costmodel import slo_seconds
from torpor.stats import ModelStats

log = logging.getLogger("torpor")

# Adapter factory: (name, version, config, version_path, model_path) -> ModelFunction.
# Injected so that neither the registry nor the data plane imports the adapters (they import torpor).
Factory = Callable[[str, int, ModelConfig, Path, Path], ModelFunction]


class Binder(Protocol):
    """Where loaded model functions meet the devices (the device runtime, or nothing)."""

    async def bind(self, key: Any, fn: ModelFunction, config: ModelConfig) -> Any | None:
        """Register a loaded version's weights; its key on the devices, or None: it runs where loaded."""

    async def unbind(self, key: Any) -> None:
        """Forget a version `bind` registered (its requests have finished)."""

    def capacity(self, config: ModelConfig) -> int:
        """Requests of a device-bound version in flight at once."""


class HostOnly:
    """No devices: every model runs where it was loaded."""

    async def bind(self, key: Any, fn: ModelFunction, config: ModelConfig) -> Any | None:
        return None

    async def unbind(self, key: Any) -> None:
        return None

    def capacity(self, config: ModelConfig) -> int:
        return 1


def _logged(e: TorporError) -> TorporError:
    """A load failure, logged once where it is raised (the start-up loop, the poll loop and the
    load API all pass it on without logging it again)."""
    log.error("%s", e.message, stacklevel=2)
    return e


def unknown_model(name: str, detail: str) -> TorporError:
    return TorporError(Status.NOT_FOUND, f"Request for unknown model: {detail}")


class ModelRegistry:
    def __init__(self, options: Any, factory: Factory, workers: concurrent.futures.Executor,
                 binder: Binder | None = None):
        self.options = options
        self.factory = factory
        self.workers = workers
        self.binder: Binder = binder or HostOnly()
        self.repository = Repository(options.model_repositories)
        self.models: dict[str, ModelEntry] = {}
        self._lock = asyncio.Lock()
        self._poll_task: asyncio.Task | None = None
        # model name -> why it failed to load at start: --exit-on-error ends the server on these
        self.start_failures: dict[str, str] = {}

    async def start(self) -> None:
        """Scan the repositories and load what the control mode says; start polling in POLL mode.
        Each model's load, success and failure is logged once, with its place in the start-up
        order, so a start that loads many models is never silent; what failed is kept in
        `start_failures`."""
        mode = self.options.model_control_mode
        sources, duplicates = self.repository.scan()
        for name in sorted(duplicates):
            self.models[name] = ModelEntry(name, error="model appears in two or more repositories")
            self.start_failures[name] = f"failed to load '{name}', model appears in two or more repositories"
            log.error("%s", self.start_failures[name])
        for name, src in sources.items():
            self.models.setdefault(name, ModelEntry(name, source=src))
        if mode in ("none", "poll"):
            to_load = sorted(sources)
        else:
            to_load = sorted(sources) if "*" in self.options.load_models else list(self.options.load_models)
        for i, name in enumerate(to_load, 1):
            try:
                async with self._lock:
                    await self._load_locked(name, None, {}, progress=f" {i}/{len(to_load)}")
            except TorporError as e:  # logged where it failed
                self.start_failures[name] = e.message
                continue
            failed = [f"version {v}: {ve.reason}" for v, ve in sorted(self.models[name].versions.items())
                      if ve.state != "READY"]
            if failed:  # some versions loaded, these did not
                self.start_failures[name] = f"failed to load '{name}', " + "; ".join(failed)
        if mode == "poll" and self.options.repository_poll_secs > 0:
            self._poll_task = asyncio.create_task(self._poll_loop())

    async def stop(self) -> None:
        """Unload every model function (the server is going down)."""
        if self._poll_task:
            self._poll_task.cancel()
        loop = asyncio.get_running_loop()
        for entry in list(self.models.values()):
            for v in entry.versions.values():
                if v.function is not None:
                    try:
                        await loop.run_in_executor(self.workers, v.function.unload)
                        log.info("successfully unloaded '%s' version %d", entry.name, v.version)
                    except Exception:
                        log.exception("unloading '%s' version %d failed", entry.name, v.version)
                    v.function = None
            drop_override(entry)

    # ---------------------------------------------------------------------------------------
    # what is there
    # ---------------------------------------------------------------------------------------
    def knows(self, name: str) -> bool:
        return name in self.models

    def all_ready(self) -> bool:
        """Every model and version is READY or was unloaded on purpose (strict readiness)."""
        for entry in self.models.values():
            if entry.error and entry.error != "unloaded":
                return False
            for v in entry.versions.values():
                if v.state == "READY" or (v.state == "UNAVAILABLE" and v.reason == "unloaded"):
                    continue
                return False
        return True

    def ready_versions(self):
        """(name, VersionEntry) of every READY version, by name and version."""
        for name in sorted(self.models):
            for _, ve in sorted(self.models[name].versions.items()):
                if ve.state == "READY":
                    yield name, ve

    def resolve(self, name: str, version: str = "") -> tuple[ModelEntry, VersionEntry]:
        """The READY version a request names (latest READY when `version` is empty)."""
        entry = self.models.get(name)
        if entry is None or entry.config is None:
            raise unknown_model(name, f"'{name}' is not found")
        if version in ("", "-1", None):
            if len(entry.versions) == 1:  # the common case, without sorting
                for ve in entry.versions.values():
                    if ve.state == "READY":
                        return entry, ve
            ready = entry.ready_versions()
            if not ready:
                raise unknown_model(name, f"'{name}' has no available versions")
            return entry, entry.versions[ready[-1]]
        try:
            v = int(version)
        except ValueError:
            raise unknown_model(name, f"'{name}' version {version} is not found") from None
        ve = entry.versions.get(v)
        if ve is None:
            raise unknown_model(name, f"'{name}' version {v} is not found")
        if ve.state != "READY":
            raise TorporError(
                Status.UNAVAILABLE,
                f"Request for unknown model: '{name}' version {v} is not at ready state",
            )
        return entry, ve

    def repository_index(self, ready_only: bool = False) -> list[dict]:
        sources, duplicates = self.repository.scan()
        names = sorted(set(sources) | set(self.models) | duplicates)
        out: list[dict] = []
        for name in names:
            entry = self.models.get(name)
            if name in duplicates:
                if not ready_only:
                    out.append({"name": name, "state": "UNAVAILABLE", "reason": "model appears in two or more repositories"})
                continue
            if entry is None or (not entry.versions and not entry.error):
                if not ready_only:
                    out.append({"name": name})
                continue
            if entry.error and not entry.versions:
                if not ready_only:
                    out.append({"name": name, "state": "UNAVAILABLE", "reason": entry.error})
                continue
            for v, ve in sorted(entry.versions.items()):
                if ready_only and ve.state != "READY":
                    continue
                item = {"name": name, "version": str(v), "state": ve.state}
                if ve.reason:
                    item["reason"] = ve.reason
                out.append(item)
        return out

    # ---------------------------------------------------------------------------------------
    # load, unload, poll
    # ---------------------------------------------------------------------------------------
    def _check_explicit(self) -> None:
        if self.options.model_control_mode != "explicit":
            raise unavailable("explicit model load / unload is not allowed if polling is enabled")

    async def load(self, name: str, config_json: str | None = None, files: dict[str, bytes] | None = None,
                   _internal: bool = False) -> None:
        """Load (or reload) a model. `files` maps `<version>/<path>` to contents (the
        `file:` load parameters); they require `config_json`, as in Triton."""
        if not _internal:
            self._check_explicit()
        async with self._lock:
            await self._load_locked(name, config_json, files or {})

    def _read(self, name: str, entry: ModelEntry, config_json: str | None, files: dict[str, bytes]):
        """What a load request asks for: (source, model folder, override folder or None, config,
        versions to load). A config that cannot be read marks a model with no loaded version
        as failed (the index shows why)."""
        if files and config_json is None:
            raise invalid_arg(f"failed to load '{name}', failed to poll from model repository: model config must be provided when loading files")
        sources, duplicates = self.repository.scan()
        if name in duplicates:
            raise _logged(internal(f"failed to load '{name}', model appears in two or more repositories"))
        src = sources.get(name)
        override_dir = None
        if files:
            refuse_override_code(name, files, self.options.allow_override_code)
            override_dir = write_override(name, files)
            model_dir = override_dir
        elif src is not None:
            model_dir = src.path
        else:
            raise _logged(internal(f"failed to load '{name}', failed to poll from model repository"))
        try:
            if config_json is not None:
                config = parse_config_json(config_json, name)
                if not self.options.strict_model_config and (model_dir / "config.pbtxt").exists():
                    config = complete_config(config, read_config(model_dir))
            elif (model_dir / "config.pbtxt").exists() or self.options.strict_model_config:
                config = read_config(model_dir)
            else:
                # Triton's minimal configuration: no config.pbtxt; the backend completes it from the
                # model's files (a python model's auto_complete_config), unless auto-complete is off.
                config = ModelConfig(name=name)
            if config.name and config.name != name:
                raise invalid_arg(f"model name in config '{config.name}' does not match the folder '{name}'")
            try:
                slo_seconds({"torpor.slo_ms": parameter(config, "torpor.slo_ms") or ""}, None)
            except ValueError as e:
                raise invalid_arg(str(e)) from None
            config.name = name
            versions = select_versions(config, available_versions(model_dir))
        except TorporError as e:
            if override_dir is not None:
                shutil.rmtree(override_dir, ignore_errors=True)
            if not entry.versions:
                entry.error = f"failed to load '{name}', {e.message}"
                entry.source = src
                self.models[name] = entry
            raise _logged(internal(f"failed to load '{name}', {e.message}")) from None
        if config_json is not None:
            try:
                confine_config(name, config, config_json, model_dir, bool(files), self.options.allow_override_code)
            except TorporError:
                if override_dir is not None:
                    shutil.rmtree(override_dir, ignore_errors=True)
                raise
        return src, model_dir, override_dir, config, versions

    async def _load_locked(self, name: str, config_json: str | None, files: dict[str, bytes],
                           progress: str = "") -> None:
        """Load `name`'s versions; `progress` (' 3/10') places it in the start-up order in the log."""
        log.info("loading%s: %s", progress, name)
        entry = self.models.get(name) or ModelEntry(name)
        src, model_dir, override_dir, config, versions = self._read(name, entry, config_json, files)

        # Load the new versions before retiring the old ones, so a failed reload keeps serving.
        started = time.monotonic()
        new_versions: dict[int, VersionEntry] = {}
        errors = []
        loop = asyncio.get_running_loop()
        for v in versions:
            ve = VersionEntry(v, state="LOADING")
            try:
                fn = self.factory(name, v, config, model_dir / str(v), model_dir)
                await loop.run_in_executor(self.workers, fn.load)
            except Exception as e:  # noqa: BLE001 - any adapter failure is a load failure
                msg = reason(e)
                ve.state, ve.reason = "UNAVAILABLE", msg
                errors.append(f"version {v}: {msg}")
                log.error("failed to load '%s' version %d: %s", name, v, msg)
            else:
                try:
                    # a device-bound model's weights go to the host store now; no device is touched
                    ve.pool_key = await self.binder.bind((name, v), fn, config)
                except Exception as e:  # noqa: BLE001
                    msg = reason(e)
                    ve.state, ve.reason = "UNAVAILABLE", msg
                    errors.append(f"version {v}: {msg}")
                    log.error("failed to load '%s' version %d: %s", name, v, msg)
                    new_versions[v] = ve
                    await loop.run_in_executor(self.workers, fn.unload)
                    continue
                ve.function = fn
                ve.state = "READY"
                ve.stats = ModelStats(name, str(v))
                ve.stats.load_duration_s = time.monotonic() - started
                ve.capacity = self._slot_count(ve, config)
                ve.slots = asyncio.Semaphore(ve.capacity)
            new_versions[v] = ve

        if errors and not any(ve.state == "READY" for ve in new_versions.values()):
            if override_dir is not None:
                shutil.rmtree(override_dir, ignore_errors=True)
            old_ready = [ve for ve in entry.versions.values() if ve.state == "READY"]
            if not old_ready:
                entry.set_config(config)
                entry.versions = new_versions
                entry.source = src
                entry.error = ""
                self.models[name] = entry
            raise internal(f"failed to load '{name}', " + "; ".join(errors))

        # A python model's auto_complete_config may have filled in its config during load.
        loaded = [ve.function for ve in new_versions.values() if ve.function is not None]
        if loaded:
            config = loaded[-1].config
        old = entry.versions
        old_override = entry.override_dir
        entry.set_config(config)
        entry.versions = new_versions
        entry.source = src
        entry.error = ""
        entry.override_dir = override_dir
        entry.labels = read_labels(model_dir, entry.outputs)
        entry.mtime = folder_mtime(model_dir)
        entry.active_sequences = set()
        self.models[name] = entry
        ready = sorted(v for v, ve in new_versions.items() if ve.state == "READY")
        # as tritonserver's verbose log: the configuration the model was loaded with, completed
        log.debug("'%s' loaded with config %s", name, json.dumps(config_to_dict(config)))
        log.info("successfully loaded '%s' version%s %s (%.1f s)", name, "s" if len(ready) > 1 else "",
                 ", ".join(map(str, ready)), time.monotonic() - started)
        await self._retire(old.values())
        if old_override is not None and old_override != override_dir:
            shutil.rmtree(old_override, ignore_errors=True)

    async def _retire(self, versions) -> None:
        loop = asyncio.get_running_loop()
        for ve in versions:
            if ve.function is None:
                continue
            # Let in-flight executions finish before unloading: take every slot.
            if ve.slots is not None:
                for _ in range(self._slot_count(ve, ve.function.config)):
                    await ve.slots.acquire()
            fn, ve.function = ve.function, None
            if ve.pool_key is not None:
                try:
                    await self.binder.unbind(ve.pool_key)
                except Exception:
                    log.exception("dropping %s version %d from the devices failed", fn.name, ve.version)
                ve.pool_key = None
            try:
                await loop.run_in_executor(self.workers, fn.unload)
                log.info("successfully unloaded '%s' version %d", fn.name, ve.version)
            except Exception:
                log.exception("unloading '%s' version %d failed", fn.name, ve.version)

    async def unload(self, name: str, unload_dependents: bool = False, _internal: bool = False) -> None:
        if not _internal:
            self._check_explicit()
        async with self._lock:
            entry = self.models.get(name)
            if entry is None:
                return  # Triton answers an unload of an unknown or never-loaded model with success
            for ve in entry.versions.values():
                if ve.state == "READY":
                    ve.state = "UNLOADING"
            await self._retire(entry.versions.values())
            for ve in entry.versions.values():
                ve.state, ve.reason = "UNAVAILABLE", "unloaded"
            drop_override(entry)

    def _slot_count(self, ve: VersionEntry, config: ModelConfig) -> int:
        """Requests of a version in flight at once. Where loaded: one per model instance. On
        devices: the devices' workers run one request at a time each, and the scheduler must
        see requests queued per device to place, queue or batch them, so the slots only bound
        admission."""
        if ve.pool_key is not None:
            return self.binder.capacity(config)
        return max(1, sum(max(1, g.count) for g in config.instance_group))

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.repository_poll_secs)
            try:
                await self.poll_once()
            except Exception:
                log.exception("repository poll failed")

    async def poll_once(self) -> None:
        """POLL mode: load new or changed models, unload removed ones."""
        sources, _ = self.repository.scan()
        for name, src in sources.items():
            entry = self.models.get(name)
            if entry is None or entry.mtime != folder_mtime(src.path):
                try:
                    await self.load(name, _internal=True)
                except TorporError:
                    pass  # logged where it failed; the index shows why
        for name in list(self.models):
            if name not in sources and self.models[name].versions:
                await self.unload(name, _internal=True)
                self.models.pop(name, None)

