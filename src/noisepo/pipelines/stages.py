"""Loops are functions, state is files: run folders, stage markers, manifest, lock.

A loop (SPIN/DNPO, ROPO) is a sequence of stages. Each stage writes its artifacts atomically into
its folder and then, last, a marker file `.<stage>.done` holding a small JSON summary. A rerun of
the same command skips every stage whose marker exists and resumes at the first one that has none,
so a clean stop or a SIGKILL at any moment costs at most the stage in flight. A partial artifact
has no marker and is never read as complete.

The run folder holds `manifest.json` (config, seeds, package versions) and a lock: a second process
pointed at the same folder refuses to start instead of corrupting the first (flock is released by
the kernel when the holder dies, so a killed run can be resumed at once).

Under several processes (`accelerate launch`, `torchrun`) the loop runs on every rank: only the
main process takes the lock, writes the manifest and the markers; it decides which stages are done
and broadcasts that, so every rank resumes at the same stage (`noisepo.distributed`).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from noisepo.errors import NoisepoError
from noisepo.io import write_json_atomic

MANIFEST = "manifest.json"
LOCK = ".lock"
_PACKAGES = ("noisepo", "torch", "transformers", "accelerate", "datasets", "peft", "trl", "openai", "vllm")


class RunFolderError(NoisepoError):
    """The output folder cannot be used: locked by another run, or holds another run's config."""


def package_versions(names=_PACKAGES) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


@dataclass
class Stage:
    """One resumable step: `folder/.name.done` is written last, after every artifact."""

    folder: Path
    name: str

    @property
    def marker(self) -> Path:
        return Path(self.folder) / f".{self.name}.done"

    @property
    def done(self) -> bool:
        return self.marker.exists()

    def summary(self) -> dict:
        return json.loads(self.marker.read_text(encoding="utf-8")) if self.done else {}

    def complete(self, summary: dict | None = None) -> None:
        record = {"stage": self.name, "finished_at": _now(), **(summary or {})}
        write_json_atomic(self.marker, record)

    def run(self, fn: Callable[[], dict | None], *, collective: bool = True) -> dict:
        """Run `fn` unless already done; `fn` writes its artifacts and returns a summary dict.

        The marker also records `seconds`, the time `fn` took, unless the summary gives its own (a
        loop's metrics stage reports the total of the stages it sums up).
        """
        from noisepo import distributed

        # Several processes: the main one decides whether the stage is done (every rank then agrees
        # on where to resume) and writes the marker; `fn` runs on every rank (collective stages
        # shard their work and write on the main process only), or on the main one alone
        # (`collective=False`: stages that need no other rank, e.g. pairs, filter, evaluation).
        if distributed.broadcast(self.done):
            return distributed.broadcast(self.summary() if distributed.is_main() else None)
        if distributed.is_main():
            Path(self.folder).mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if collective:
            summary = fn() or {}
        else:
            summary = distributed.run_on_main(fn) or {}
        if distributed.is_main():
            self.complete({**summary, "seconds": summary.get("seconds", round(time.perf_counter() - started, 2))})
        return distributed.broadcast(self.summary() if distributed.is_main() else None)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RunFolder:
    """The output folder of a loop: lock, manifest, stage folders.

    Use as a context manager: `with RunFolder(out, config_dict, seeds={...}) as run: ...`.
    """

    def __init__(self, root, config: dict[str, Any], *, seeds: dict[str, int] | None = None,
                 resume_keys_ignored: tuple[str, ...] = ()):
        self.root = Path(root)
        self.config = config
        self.seeds = seeds or {}
        self.ignored = set(resume_keys_ignored)
        self._lock_fd: int | None = None

    # ----------------------------------------------------------------------- lock
    def __enter__(self) -> RunFolder:
        from noisepo import distributed

        # Under several processes only the main one takes the lock and writes the manifest; the
        # others wait for it (and raise its error, when it refuses the folder).
        distributed.run_on_main(self._enter)
        return self

    def _enter(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunFolderError(f"cannot create the output folder {self.root}: {err.strerror}") from None
        if not os.access(self.root, os.W_OK):
            raise RunFolderError(f"the output folder {self.root} is not writable")
        self._acquire_lock()
        try:
            self._check_or_write_manifest()
        except BaseException:
            self._release_lock()
            raise

    def __exit__(self, *exc) -> None:
        self._release_lock()

    def _acquire_lock(self) -> None:
        import fcntl

        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(
                f"{self.root} is in use by another noisepo run (pid {holder}); wait for it to finish "
                "or choose another --output") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            import fcntl

            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # ----------------------------------------------------------------------- manifest
    def _check_or_write_manifest(self) -> None:
        path = self.root / MANIFEST
        if path.exists():
            previous = json.loads(path.read_text(encoding="utf-8"))
            diff = _first_difference(previous.get("config", {}), self.config, ignored=self.ignored)
            if diff is not None:
                key, old, new = diff
                raise RunFolderError(
                    f"{self.root} holds a run with a different config ('{key}': {old!r} there, {new!r} now); "
                    "resume with the same options or choose another --output")
            return
        write_json_atomic(path, {
            "config": self.config,
            "seeds": self.seeds,
            "packages": package_versions(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "argv": sys.argv,
            "started_at": _now(),
        })

    # ----------------------------------------------------------------------- stages
    def folder(self, name: str) -> Path:
        from noisepo import distributed

        path = self.root / name
        if distributed.is_main():
            path.mkdir(parents=True, exist_ok=True)
        return path

    def stage(self, folder_name: str, stage_name: str) -> Stage:
        return Stage(self.folder(folder_name), stage_name)


def _first_difference(old: Any, new: Any, *, prefix: str = "", ignored=frozenset()):
    """The first (dotted key, old, new) where two config dicts differ, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            full = f"{prefix}{key}"
            if full in ignored:
                continue
            diff = _first_difference(old.get(key), new.get(key), prefix=full + ".", ignored=ignored)
            if diff is not None:
                return diff
        return None
    if old != new:
        return prefix.rstrip("."), old, new
    return None
