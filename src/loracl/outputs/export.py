"""`loracl export`: write a run's final adapter folder, or the base model with it merged in, without ever
destroying a user's file.

`export` refuses a target that is, holds or lies inside its source; `--overwrite` replaces only a folder an
earlier export wrote (it holds `loracl_export.json`: what was exported, and a sha256 per file, an unknown
file that PEFT, transformers and vLLM ignore). The export is written into a temporary sibling of the
target, verified (every tensor of the copied or merged weights reads back; copies hash like their source)
and renamed into place only then, so a failure leaves nothing half-written and an old export stays until the
new one is complete.

`--merge` of a run on a quantised base (model.quantization: 4bit, 8bit) de-quantises the base to its
compute dtype (model.dtype; auto: bfloat16) before merging, so the merged model is the one the run
evaluated, in plain weights; it needs bitsandbytes (on the CPU if it has a backend there, else on CUDA),
refused in one line otherwise. An adapter folder given alone records no quantisation: its base is loaded
as `--model`/the adapter names it, unquantised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import PreTrainedModel
from transformers.utils import logging as transformers_logging

from loracl import __version__
from loracl.errors import ConfigError, ModelError, RunFolderError
from loracl.files import (
    UnsafeFileError,
    fsync_dir,
    read_bytes_limited,
    read_json_limited,
    write_durable,
    write_json_durable,
)
from loracl.methods import method_class
from loracl.models.base_model import check_quantization, load_model, quantized_dtype
from loracl.models.multi_lora import read_tensors, short
from loracl.outputs.deploy import Source, _run_method, load_final_model, read_run_results, resolve_source
from loracl.outputs.loading import load_adapter, read_adapter_folder

EXPORT_MARKER = "loracl_export.json"
EXPORT_FORMAT = "loracl-export"


def check_mergeable(source: Source) -> None:
    """Refuse to merge adapters that are not a fixed weight update (the method says why)."""
    if source.method is None:
        return
    obstacle = method_class(source.method).merge_obstacle
    if obstacle:
        raise ConfigError(f"--merge: {source.method} adapters cannot be merged into the weights: {obstacle}")


# -- export: target checks ---------------------------------------------------------------------------------
def _check_apart(target: Path, given: Path, source: Source) -> None:
    """Refuse a target that is, contains or lies inside the source (resolved paths: links followed)."""
    for folder in dict.fromkeys(p for p in (source.run_dir, source.adapter_dir) if p is not None):
        root = folder.resolve()
        if target == root or root in target.parents or target in root.parents:
            where = "is" if target == root else "lies inside" if root in target.parents else "contains"
            raise ConfigError(f"--to: {given} {where} the source {folder}; export to a folder outside it")


def _unreadable(exc: OSError) -> None:
    """os.walk skips a folder it cannot list; an export must not silently leave part of one behind."""
    raise RunFolderError(f"{exc.filename}: cannot read the folder ({exc.strerror})")


def _entries(folder: Path) -> Iterator[tuple[str, Path]]:
    """Every file (links included, not followed) below `folder`, as (relative posix path, path)."""
    for current, dirs, files in os.walk(folder, onerror=_unreadable):
        here = Path(current)
        names = files + [d for d in dirs if (here / d).is_symlink()]  # links to folders: not walked
        for name in sorted(names):
            yield (here / name).relative_to(folder).as_posix(), here / name


def _check_replaceable(target: Path, given: Path) -> None:
    """Refuse to replace a folder that is not an earlier export, or that holds files export did not write."""
    try:
        marker = read_json_limited(target / EXPORT_MARKER)
    except UnsafeFileError:
        marker = None
    if not isinstance(marker, dict) or marker.get("format") != EXPORT_FORMAT:
        raise ConfigError(
            f"--to: {given} is not empty and not a loracl export (no {EXPORT_MARKER}); --overwrite replaces "
            "only a folder loracl exported"
        )
    written = marker.get("files") if isinstance(marker.get("files"), dict) else {}
    for relative, _ in _entries(target):
        if relative != EXPORT_MARKER and relative not in written:
            raise ConfigError(
                f"--to: {given / relative} was not written by loracl export; move it away or export elsewhere"
            )


def _check_target(target: Path, given: Path, overwrite: bool) -> None:
    """A target may be absent, an empty folder, or (with `overwrite`) an earlier export."""
    if not os.path.lexists(target):
        return
    if not target.is_dir():
        raise ConfigError(f"--to: {given} exists and is not a folder; refusing to replace it")
    try:
        empty = not any(target.iterdir())
    except OSError as exc:
        raise ConfigError(f"--to: cannot read {given}: {exc.strerror}") from None
    if empty:
        return
    if not overwrite:
        raise ConfigError(f"--to: {given} exists and is not empty; choose another folder or --overwrite")
    _check_replaceable(target, given)


# -- export: writing -----------------------------------------------------------------------------------------
def _sibling(target: Path, kind: str) -> Path:
    """A fresh hidden name beside `target` (same file system, so a rename moves it)."""
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _missing_parents(folder: Path) -> list[Path]:
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def _replace(staging: Path, target: Path, given: Path) -> None:
    """Move the complete export into place; an earlier export is set aside until the rename succeeded."""
    if not (target.is_dir() and any(target.iterdir())):
        os.rename(staging, target)  # absent, or an empty folder, which rename replaces
    else:
        _check_replaceable(target, given)  # again: the folder may have changed while the export was written
        old = _sibling(target, "old")
        os.rename(target, old)
        try:
            os.rename(staging, target)
        except OSError:
            os.rename(old, target)
            raise
        shutil.rmtree(old)
    fsync_dir(target.parent)


@contextlib.contextmanager
def _staging(target: Path, given: Path) -> Iterator[Path]:
    """A temporary folder beside `target` to write the export in, renamed to `target` when the block ends;
    on any failure it is removed (with the parent folders it created) and `target` is left as it was."""
    created = _missing_parents(target.parent)
    staging = _sibling(target, "tmp")
    try:
        staging.mkdir(parents=True)
        yield staging
        _replace(staging, target, given)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(exc, OSError):
            raise ConfigError(f"--to: cannot write {given}: {exc.strerror or exc}") from None
        raise


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _copy_file(source: Path, copy: Path) -> str:
    """Copy one file of an adapter folder, safetensors checked first (every tensor reads); its sha256."""
    try:
        data = read_bytes_limited(source)
    except UnsafeFileError as exc:
        raise RunFolderError(str(exc)) from None
    if source.suffix == ".safetensors":
        read_tensors(source, data)
    copy.parent.mkdir(parents=True, exist_ok=True)
    write_durable(copy, lambda handle: handle.write(data))
    return hashlib.sha256(data).hexdigest()


def _copy_adapter(adapter_dir: Path, staging: Path) -> dict[str, str]:
    """Copy the adapter folder into `staging`, then check that every copy hashes like its source."""
    hashes = {}
    for relative, path in _entries(adapter_dir):
        if relative == EXPORT_MARKER:
            continue  # an exported folder exported again: a new marker is written
        if path.is_dir():
            raise RunFolderError(f"{path}: a link to a folder; loracl does not export links")
        hashes[relative] = _copy_file(path, staging / relative)
    for relative, digest in hashes.items():
        if _sha256(staging / relative) != digest:
            raise RunFolderError(f"{adapter_dir / relative}: its copy does not read back equal (disk error?)")
    return hashes


def _check_saved_tensors(merged: PreTrainedModel, folder: Path, shown: Path) -> None:
    """Every tensor saved in `folder` reads back equal to the merged model's, and every tensor of the
    merged model's state dict is saved (itself or a tensor it shares memory with: tied weights). Messages
    name the file as it will be called (`shown`), not the temporary folder."""
    state = merged.state_dict()
    saved: set[str] = set()
    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (a safe_open handle is no dict)
                    value = handle.get_tensor(key)
                    if key not in state or not torch.equal(value, state[key].detach().cpu()):
                        raise RunFolderError(f"{shown / path.name}: {key} does not read back as merged")
                    saved.add(key)
        except RunFolderError:
            raise
        except Exception as exc:  # a torn file: SafetensorError, OSError
            reason = short(exc, 120)
            raise RunFolderError(
                f"{shown / path.name}: the written weights do not read back: {reason}"
            ) from None
    stored = {state[key].data_ptr() for key in saved}
    unsaved = sorted(
        key for key, value in state.items() if key not in saved and value.data_ptr() not in stored
    )
    if not files or unsaved:
        raise RunFolderError(f"{shown}: the merged model was not saved whole ({unsaved[:1] or 'no weights'})")


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' "Writing model shards" bar would put lines on stderr beside export's own."""
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def _quantized_device(quantization: str, dtype: str) -> str:
    """Where a quantised base is de-quantised: the CPU when bitsandbytes has a backend there, else CUDA."""
    cpu = torch.device("cpu")
    try:
        check_quantization(quantization, cpu, quantized_dtype(dtype, cpu))
    except ModelError:
        if not torch.cuda.is_available():
            raise
        return "cuda"
    return "cpu"


def _dequantized_merge(source: Source, quantization: str) -> tuple[PreTrainedModel, Any]:
    """A run on a quantised base (model.quantization): the base is loaded quantised, as the run trained and
    evaluated it, de-quantised to its compute dtype (model.dtype; auto: bfloat16), and the adapters are
    merged into that: the saved weights are the quantised ones plus s B A, a plain model that computes what
    the run evaluated. (Merging into the 4-bit or 8-bit weights themselves would re-quantise the sum and
    lose most of the adapter's update.)"""
    m = source.config.model
    device = _quantized_device(quantization, m.dtype)
    loaded = load_model(
        m.name, dtype=m.dtype, device=device, cache_dir=m.cache_dir, quantization=quantization
    )
    dtype = quantized_dtype(m.dtype, torch.device(device))
    base = loaded.model.dequantize(dtype=dtype).to(dtype)  # the norms prepare_model_for_kbit_training upcast
    model = load_adapter(source.adapter_dir, base)
    return model.merge_and_unload().cpu(), loaded.tokenizer


def _merged_model(source: Source) -> tuple[PreTrainedModel, Any]:
    """The base model with every active adapter added into its weights, and its tokenizer."""
    if source.config.model.quantization:
        return _dequantized_merge(source, source.config.model.quantization)
    # On CPU, in the dtype the run's base weights had: `dtype: auto` alone would give float32 here for a
    # run that trained in bfloat16 on a GPU.
    run_dtype = read_run_results(source.run_dir).get("base_dtype") if source.run_dir else None
    model, loaded = load_final_model(source, device="cpu", dtype=run_dtype)
    return model.merge_and_unload(), loaded.tokenizer  # W0 + sum over active adapters of s B A


def _save_merged(merged: PreTrainedModel, tokenizer: Any, staging: Path, shown: Path) -> dict[str, str]:
    """Save the merged model and its tokenizer, check the weights read back; the sha256 of every file."""
    with _no_progress_bars():
        merged.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    _check_saved_tensors(merged, staging, shown)
    return {relative: _sha256(path) for relative, path in _entries(staging)}


def _write_marker(staging: Path, source: Source, kind: str, hashes: dict[str, str]) -> None:
    marker = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "loracl_version": __version__,
        "source": str(source.root.resolve()),
        "kind": kind,
        "method": source.method,
        "files": hashes,
    }
    write_json_durable(marker, staging / EXPORT_MARKER)


def export(
    run_dir: str | Path,
    target: str | Path,
    merge: bool = False,
    overwrite: bool = False,
    adapter_dir: Path | None = None,
) -> Path:
    """Write the final adapter folder (as the run left it), or with `merge` the base model with every active
    adapter added into its weights, saved with its tokenizer as a plain transformers folder. `adapter_dir`:
    another adapter folder of the run to export instead of adapter/ (an adapter version,
    loracl.outputs.versions.export_version), with the run's config and method."""
    source = resolve_source(run_dir)
    if adapter_dir is not None:
        _run_method(source.root, read_adapter_folder(adapter_dir), source.method)  # its files checked too
        source = dataclasses.replace(source, adapter_dir=adapter_dir)
    given = Path(target)
    if merge:
        check_mergeable(source)
    resolved = given.resolve()
    _check_apart(resolved, given, source)
    _check_target(resolved, given, overwrite)
    merged = _merged_model(source) if merge else None  # loaded before anything is written
    with _staging(resolved, given) as staging:
        if merged is None:
            hashes = _copy_adapter(source.adapter_dir, staging)
        else:
            hashes = _save_merged(*merged, staging, given)
        _write_marker(staging, source, "plain" if merged is None else "merged", hashes)
    return given
