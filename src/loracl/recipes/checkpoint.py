"""Checkpoints after every finished task, so that a crashed or stopped run resumes where it was (`--resume`).

Layout inside the run directory:

    checkpoint/
      latest.json       {"format": "loracl-checkpoint", "version": 2, "directory": "task-002",
                         "finished": 2, "config_hash": ...}: the one complete checkpoint to resume from
      task-002/
        state.pt        the PEFT configs (as plain dicts) and tensors of every adapter (and of any module a
                        method attached beside them, e.g. GainLoRA's gates) and the method's state between
                        tasks; read with torch.load(weights_only=True): tensors, plain containers and the
                        few classes of STATE_CLASSES, never arbitrary objects
        results.json    the results so far (matrix rows, zero-shot scores, timings, per_task)

No optimizer state: every task starts a fresh AdamW (loracl.engine.training). A new `task-<k>/` is
written under a
temporary name, flushed to disk and renamed; only then is `latest.json` replaced (atomically), and only then
are older folders removed. A kill at any moment therefore leaves `latest.json` naming a complete folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel

from loracl.data.text import Encoded
from loracl.errors import CheckpointError
from loracl.files import (
    UnsafeFileError,
    fsync_dir,
    is_write_failure,
    read_json_limited,
    write_durable,
    write_failure_reason,
    write_json_atomic,
    write_json_durable,
)
from loracl.methods import ContinualMethod, state_classes
from loracl.methods.memory import ReservoirMemory
from loracl.models.lora import LoraPair

CHECKPOINT_DIR = "checkpoint"
LATEST = "latest.json"
STATE = "state.pt"
RESULTS = "results.json"
FORMAT = "loracl-checkpoint"
VERSION = 2  # 1 (loracl before 2026-11-28): state.pt pickled whole, PEFT config objects included
# The classes a method's state may hold besides tensors, numbers, strings and containers; anything else in a
# checkpoint is refused on reading, so resuming a run directory from elsewhere cannot run code.
STATE_CLASSES = (LoraPair, Encoded, ReservoirMemory, random.Random)


def allowed_state_classes() -> list[type]:
    """STATE_CLASSES and the classes methods registered (loracl.methods.register_state_class)."""
    return [*STATE_CLASSES, *state_classes()]


def check_method_state(method: ContinualMethod, state: dict[str, Any]) -> None:
    """Refuse (CheckpointError, one line), before anything is written, a method state that `_load_state`
    could not read back: an object of a class neither built in nor registered, or one pickle cannot save.
    Found now, not when a run is resumed."""

    def problem(value: Any) -> str | None:
        buffer = io.BytesIO()
        try:
            torch.serialization.save(value, buffer)
            buffer.seek(0)
            with torch.serialization.safe_globals(allowed_state_classes()):
                torch.serialization.load(buffer, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001  (any failure: the checkpoint could not be read back)
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            if found:
                return f"it holds a {found.group(1)}, a class a checkpoint does not read back"
            return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        return None

    whole = problem(state)
    if whole is None:
        return
    name, reason = next(((k, r) for k, v in state.items() if (r := problem(v)) is not None), ("", whole))
    what = f"state attribute {name!r}" if name else "state"
    raise CheckpointError(
        f"method {method.name!r}: {what} cannot be checkpointed ({reason}; a checkpoint "
        "holds tensors, numbers, strings, containers and classes registered with "
        "loracl.methods.register_state_class); nothing was written"
    )


_STATE_PARTS = ("peft_configs", "tensors", "method")


@dataclass
class Checkpoint:
    finished: int  # training steps (tasks) finished and recorded
    results: dict[str, Any]
    state: dict[str, Any]


def config_hash(config_yaml: str) -> str:
    return hashlib.sha256(config_yaml.encode("utf-8")).hexdigest()[:16]


def added_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The tensors a run adds to the frozen base model: every LoRA tensor inside PEFT's `base_model`, and
    every module a method attached to the PeftModel beside it (GainLoRA's gates)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("base_model.") or "lora_" in k}


def plain_peft_config(config: PeftConfig) -> dict[str, Any]:
    """A PEFT config as JSON types (sets as sorted lists, enums as strings): safe to load, and the same
    config again through PeftConfig.from_peft_type."""
    return json.loads(json.dumps(config.to_dict(), default=sorted))


def _load_state(path: Path, device: torch.device) -> dict[str, Any]:
    """state.pt as save_checkpoint wrote it, with PEFT config objects. Read with weights_only=True only:
    nothing in a run directory is ever unpickled with the full unpickler, which runs whatever code the
    file names (a run directory may come from someone else)."""
    try:
        with torch.serialization.safe_globals(allowed_state_classes()):
            state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path.parent}: unreadable checkpoint (it holds objects other than tensors and loracl's state "
            "classes; not loaded, as unpickling them could run code)"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(state.get(k), dict) for k in _STATE_PARTS):
        raise ValueError(f"state.pt must hold a dict with {', '.join(_STATE_PARTS)}")
    if not all(isinstance(t, torch.Tensor) for t in state["tensors"].values()):
        raise ValueError("state.pt: 'tensors' holds something other than tensors")
    configs = state["peft_configs"]
    state["peft_configs"] = {name: PeftConfig.from_peft_type(**plain) for name, plain in configs.items()}
    return state


def _folder_name(finished: int) -> str:
    return f"task-{finished:03d}"


def save_checkpoint(
    run_dir: Path,
    model: PeftModel,
    method: ContinualMethod,
    results: dict[str, Any],
    finished: int,
    digest: str,
) -> None:
    """Write the checkpoint after `finished` tasks; the previous one stays valid until this one is done."""
    root = run_dir / CHECKPOINT_DIR
    target = root / _folder_name(finished)
    partial = root / f".{target.name}.partial"
    payload = {
        "peft_configs": {name: plain_peft_config(config) for name, config in model.peft_config.items()},
        "tensors": added_state(model),
        "method": method.state_dict(),
    }
    check_method_state(method, payload["method"])
    try:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        write_durable(partial / STATE, lambda handle: torch.save(payload, handle))
        write_json_durable(results, partial / RESULTS)
        fsync_dir(partial)
        if target.exists():  # left by a run that died before naming it in latest.json: never the live one
            shutil.rmtree(target)
        os.replace(partial, target)
        fsync_dir(root)
        latest = {"format": FORMAT, "version": VERSION, "directory": target.name, "finished": finished}
        write_json_atomic({**latest, "config_hash": digest}, root / LATEST)
        fsync_dir(root)
    except Exception as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if not is_write_failure(exc):
            raise
        kept = (
            f"the checkpoint after task {finished - 1} is intact; resume with: loracl run --resume --output "
            f"{run_dir}"
            if finished > 1
            else "no checkpoint yet"
        )
        reason = write_failure_reason(exc)
        raise CheckpointError(
            f"cannot write the checkpoint after task {finished} in {root} ({reason}); {kept}"
        ) from exc
    for old in root.glob("task-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)


def _read_latest(root: Path) -> dict[str, Any]:
    """latest.json, checked field by field: a run folder may come from anywhere."""
    where = root / LATEST
    try:
        latest = read_json_limited(where, limit=1 << 20)
    except UnsafeFileError as exc:
        raise CheckpointError(f"unreadable checkpoint pointer: {exc}") from exc
    if not isinstance(latest, dict) or latest.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a loracl checkpoint pointer")
    version = latest.get("version")
    if version != VERSION:
        raise CheckpointError(
            f"{root}: checkpoint format version {version!r}, not {VERSION}: not read (version 1 pickled "
            "whole objects, and unpickling them could run code); start the run again without --resume"
        )
    finished, directory = latest.get("finished"), latest.get("directory")
    if not isinstance(finished, int) or isinstance(finished, bool) or finished < 1:
        raise CheckpointError(f"{where}: 'finished' must be a positive number of tasks, got {finished!r}")
    if directory != _folder_name(finished):  # also keeps the pointer inside checkpoint/
        raise CheckpointError(f"{where}: 'directory' must be {_folder_name(finished)!r}, got {directory!r}")
    return latest


def checkpoint_version(run_dir: Path) -> int:
    """The format version of a run's checkpoint, which must be this loracl's (CheckpointError otherwise)."""
    return _read_latest(run_dir / CHECKPOINT_DIR)["version"]


def checkpoint_digest(run_dir: Path) -> str | None:
    """The config hash the run's latest checkpoint was written for (None: no task finished yet)."""
    root = run_dir / CHECKPOINT_DIR
    if not (root / LATEST).is_file():
        return None
    digest = _read_latest(root).get("config_hash")
    return digest if isinstance(digest, str) else None


def read_checkpoint(run_dir: Path, digest: str, device: torch.device) -> Checkpoint | None:
    """The latest complete checkpoint of `run_dir` (None when no task had finished)."""
    root = run_dir / CHECKPOINT_DIR
    if not (root / LATEST).is_file():
        return None
    latest = _read_latest(root)
    if latest.get("config_hash") != digest:
        raise CheckpointError(f"{root}: written for another configuration than {run_dir / 'config.yaml'}")
    folder = root / latest["directory"]
    try:
        results = read_json_limited(folder / RESULTS)
        state = _load_state(folder / STATE, device)
    except UnsafeFileError as exc:
        raise CheckpointError(f"{folder}: unreadable checkpoint ({exc})") from exc
    except (OSError, EOFError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{folder}: unreadable checkpoint ({reason})") from exc
    if not isinstance(results, dict) or len(results.get("per_task", ())) != latest["finished"]:
        raise CheckpointError(f"{folder / RESULTS}: not the results of {latest['finished']} finished task(s)")
    return Checkpoint(latest["finished"], results, state)


def restore_checkpoint(model: PeftModel, method: ContinualMethod, checkpoint: Checkpoint) -> None:
    """Bring a freshly prepared model and method to the state they had when `checkpoint` was written."""
    for name, adapter_config in checkpoint.state["peft_configs"].items():
        if name not in model.peft_config:  # adapters added by later tasks, in their original order
            model.add_adapter(name, adapter_config)
    method.rebuild(model, checkpoint.finished)
    tensors = checkpoint.state["tensors"]
    expected = added_state(model).keys()
    if expected != tensors.keys():
        odd = sorted(expected ^ tensors.keys())[:3]
        raise CheckpointError(f"the checkpoint does not fit the model built from the config (e.g. {odd})")
    model.load_state_dict(tensors, strict=False)
    method.load_state_dict(checkpoint.state["method"])
