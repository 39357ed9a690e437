"""The run folder and its checkpoints, one layout for every launcher:

    OUTPUT/run.json                  the run's id (every checkpoint carries it) and its launcher
    OUTPUT/checkpoints/step_XXXXXX/  client.json (run id, step, the recipe or arguments), state.pt (model,
                                     optimizer, random state: a plain run) or engine/ + rng_rank<r>.pt
                                     (DeepSpeed), export/ (the model as its users load it)
    OUTPUT/checkpoints/latest        the newest checkpoint's name
    OUTPUT/export/                   a copy of the newest checkpoint's export/

A checkpoint is written under .tmp-step_XXXXXX and renamed into place, so a crash leaves the previous one whole.
A folder that holds another run is refused unless the user says --resume (continue it) or --overwrite
(delete it first): a new run never destroys an earlier one by accident."""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from .files import atomic_json, atomic_save, atomic_text, fsync_dir
from .runtime import Runtime
from .seeding import rng_state, set_rng_state

CHECKPOINTS, EXPORT, LATEST, RUN_FILE, CLIENT_FILE = "checkpoints", "export", "latest", "run.json", "client.json"
STATE_FILE, EXTRA_FILE, ENGINE_TAG = "state.pt", "extra.pt", "engine"
CHECKPOINT_PREFIX, TEMPORARY_PREFIX = "step_", ".tmp-"
CHECKPOINT_FORMAT = 2
# What a run writes at the top of its folder: what --overwrite deletes (nothing else in the folder is touched).
# The first ones are its work; a folder with only the last ones (a start that failed at once) holds no run.
WORK_ENTRIES = (CHECKPOINTS, EXPORT, "log.jsonl", "tb", "loss_curve.png", "eval_test.json", "eval_test_shifted.json",
                "summary.json", "samples.png", "examples.png")
RUN_ENTRIES = WORK_ENTRIES + (RUN_FILE, "recipe.yaml")


class RunFolderError(RuntimeError):
    """The output folder cannot be used as asked; the message says what to do instead."""


def checkpoint_dirs(output: Path) -> list[Path]:
    """The complete checkpoints (renamed into place), oldest first."""
    folder = Path(output) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(output: Path) -> Path | None:
    """The folder `checkpoints/latest` names; the newest complete one if the pointer is missing or stale."""
    pointer = Path(output) / CHECKPOINTS / LATEST
    if pointer.is_file():
        candidate = pointer.parent / pointer.read_text().strip()
        if candidate.is_dir():
            return candidate
    found = checkpoint_dirs(output)
    return found[-1] if found else None


def read_client(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / CLIENT_FILE
    try:
        client = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RunFolderError(f"--resume: {path} cannot be read ({error}); {checkpoint} is not a complete "
                             "checkpoint of this project") from None
    if client.get("format") != CHECKPOINT_FORMAT:
        raise RunFolderError(f"--resume: {checkpoint} has checkpoint format {client.get('format')!r}, this version "
                             f"reads format {CHECKPOINT_FORMAT}")
    return client


def differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """'key: saved -> current' for every dotted key whose value differs (lists of named entries by name)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in list(saved) + [k for k in current if k not in saved]:
            out += differences(saved.get(key, "<absent>"), current.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    if (isinstance(saved, list) and isinstance(current, list) and saved and current
            and all(isinstance(e, dict) and "name" in e for e in saved + current)):
        return differences({e["name"]: e for e in saved}, {e["name"]: e for e in current}, prefix)
    if json.dumps(saved, sort_keys=True, default=str) != json.dumps(current, sort_keys=True, default=str):
        return [f"{prefix.rstrip('.')}: {json.dumps(saved, default=str)} -> {json.dumps(current, default=str)}"]
    return []


def _sync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _refresh_copy(source: Path, target: Path) -> None:
    """Copies `source` beside `target`, then swaps it in by two renames."""
    staging, old = target.with_name(f".{target.name}.new"), target.with_name(f".{target.name}.old")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    shutil.copytree(source, staging)
    if target.exists():
        os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)


class RunFolder:
    """OUTPUT: its run id, its checkpoints (written, rotated, found and loaded) and its export."""

    def __init__(self, output: str | os.PathLike, runtime: Runtime, launcher: str, keep: int = 2):
        self.output, self.runtime, self.launcher, self.keep = Path(output), runtime, launcher, keep
        self.run_id: str | None = None
        self._rng: dict[str, Any] | None = None  # the random state `load` read, set by `restore_rng`

    # ------------------------------------------------------------------------------------------ the folder
    def holds_a_run(self) -> list[str]:
        """The entries of an earlier run's work in the folder (empty: nothing a new run could destroy)."""
        return [name for name in WORK_ENTRIES if (self.output / name).exists()]

    def prepare(self, resume: bool, overwrite: bool) -> Path | None:
        """Checks the folder against --resume/--overwrite and fixes the run id (on every rank). Returns the
        checkpoint to resume from (None: a fresh start)."""
        if resume and overwrite:
            raise RunFolderError("--resume and --overwrite contradict each other: choose one")
        problem, found = None, None
        if self.runtime.is_main:
            try:
                found = self._prepare_on_main(resume, overwrite)
            except RunFolderError as error:
                problem = str(error)
        problem, self.run_id, found = self.runtime.broadcast_object((problem, self.run_id, found))
        if problem:
            raise RunFolderError(problem)
        return Path(found) if found else None

    def _prepare_on_main(self, resume: bool, overwrite: bool) -> str | None:
        entries = self.holds_a_run()
        if entries and not resume:
            if not overwrite:
                raise RunFolderError(
                    f"{self.output} holds another run ({', '.join(entries)}); continue it with --resume, start afresh "
                    "there with --overwrite (which deletes that run), or choose another --output")
            for name in RUN_ENTRIES:
                path = self.output / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            entries = []
        found = latest_checkpoint(self.output) if resume else None
        run_file = self.output / RUN_FILE
        written = json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None
        if found is not None:
            client = read_client(found)
            recorded = written or client["run_id"]
            if client["run_id"] != recorded:
                raise RunFolderError(f"--resume: {found} belongs to run {client['run_id']}, but {self.output} is run "
                                     f"{recorded}; the checkpoint is not this run's")
            if client.get("launcher") != self.launcher:
                raise RunFolderError(f"--resume: {found} was written by launch/{client.get('launcher')}.py, not "
                                     f"launch/{self.launcher}.py")
            self.run_id = recorded
        elif resume and written:  # a run that stopped before its first checkpoint
            self.run_id = written
        else:
            self.run_id = uuid.uuid4().hex[:16]
        self.output.mkdir(parents=True, exist_ok=True)
        if written != self.run_id:
            atomic_json(run_file, {"run_id": self.run_id, "launcher": self.launcher,
                                   "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        return str(found) if found is not None else None

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self, step: int, client: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             engine: Any = None, export: Callable[[Path, Path], None] | None = None,
             extra: dict[str, Any] | None = None) -> Path:
        """Writes checkpoint `step` on every rank: `client` (plain data: the launcher's position and recipe),
        the model and optimizer (through the engine under DeepSpeed), every rank's random state and rank 0's
        `extra` tensors (extra.pt: an EMA, say); then rank 0 calls `export(folder, engine_dir)` to write export/,
        renames the checkpoint into place, points `latest` at it, refreshes OUTPUT/export and removes the oldest
        beyond `keep`."""
        runtime, folder = self.runtime, self.output / CHECKPOINTS
        name = f"{CHECKPOINT_PREFIX}{step:06d}"
        final, tmp = folder / name, folder / f"{TEMPORARY_PREFIX}{name}"
        if runtime.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        runtime.barrier()
        client = {"format": CHECKPOINT_FORMAT, "run_id": self.run_id, "launcher": self.launcher, "step": step,
                  "world_size": runtime.world_size, **client}
        if engine is None:
            atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state()},
                        tmp / STATE_FILE)
        else:
            engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, client_state={"run_id": self.run_id},
                                   save_latest=False)
            atomic_save(rng_state(), tmp / f"rng_rank{runtime.rank}.pt")
        runtime.barrier()
        if runtime.is_main:
            atomic_json(tmp / CLIENT_FILE, client)
            if extra is not None:
                atomic_save(extra, tmp / EXTRA_FILE)
            if export is not None:
                export(tmp / EXPORT, tmp)
            _sync_tree(tmp)
            if final.exists():  # the same step saved again (a resumed run that stops where it started)
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(folder)
            atomic_text(folder / LATEST, name)
            if (final / EXPORT).is_dir():
                _refresh_copy(final / EXPORT, self.output / EXPORT)
            older = [p for p in checkpoint_dirs(self.output) if int(p.name[len(CHECKPOINT_PREFIX):]) < step]
            for old in older[:max(0, len(older) - (self.keep - 1))]:
                shutil.rmtree(old, ignore_errors=True)
        runtime.barrier()
        return final

    def load(self, checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
             engine: Any = None) -> dict[str, Any]:
        """Restores model and optimizer (None: weights only) from `checkpoint`; returns its client state, with
        the `extra` tensors under "extra". The random state is restored by `restore_rng` (last, so nothing draws
        from it before the first step)."""
        client = read_client(checkpoint)
        if (checkpoint / EXTRA_FILE).is_file():
            client["extra"] = torch.load(checkpoint / EXTRA_FILE, map_location="cpu", weights_only=True)
        if engine is None:
            path = checkpoint / STATE_FILE
            if not path.is_file():
                raise RunFolderError(f"--resume: {checkpoint} has no {STATE_FILE}: it was written by a DeepSpeed run; "
                                     "resume it under DeepSpeed")
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            if optimizer is not None:
                optimizer.load_state_dict(state["optimizer"])
            self._rng = state["rng"]
        else:
            if not (checkpoint / ENGINE_TAG).is_dir():
                raise RunFolderError(f"--resume: {checkpoint} holds no DeepSpeed checkpoint ({ENGINE_TAG}/): it was "
                                     "written by a plain run; resume it without DeepSpeed")
            engine.load_checkpoint(str(checkpoint), tag=ENGINE_TAG, load_optimizer_states=optimizer is not None,
                                   load_lr_scheduler_states=False)
            rng_file = checkpoint / f"rng_rank{self.runtime.rank}.pt"
            self._rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
        if client.get("world_size", 1) != self.runtime.world_size and self.runtime.is_main:
            print(f"note: {checkpoint} was written by {client.get('world_size')} rank(s), this run has "
                  f"{self.runtime.world_size}: the data is re-sharded, so batches differ from an uninterrupted run")
        return client

    def restore_rng(self) -> None:
        if self._rng is not None:
            set_rng_state(self._rng)
