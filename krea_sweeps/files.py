"""The on-disk layer: writes that are all-or-nothing and safe on a shared cluster filesystem, reads that verify.

Array jobs start at the same second on many nodes that share one filesystem, so every cache build and write takes a
`filelock` beside its target, writes into a uniquely named temporary (`mkstemp`/`mkdtemp` in the target's folder: a
PID repeats across nodes), fsyncs it and renames it into place. Temporaries are removed on success, failure and a full
disk. Cache entries carry a content hash checked on read, so a damaged file is recomputed (one warning), never used.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger("krea_sweeps")

LOCK_TIMEOUT_S = 3600.0  # a cache build (the synthetic model, a real encode) never takes an hour; a dead lock would


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive cross-process (and cross-node, on a shared filesystem) lock for building or writing `path`."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(f".{path.name}.lock")), timeout=LOCK_TIMEOUT_S):
        yield


def _fsync(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: Path, durable: bool = True) -> Iterator[Path]:
    """Yield a uniquely named temporary sibling of `path` (same suffix, so writers that infer the format still can);
    after the body succeeds it is fsynced and renamed into place. Nothing is left behind when the body fails.
    `durable=False` skips the two fsyncs (still all-or-nothing for readers): for many small files that the caller
    flushes together afterwards (`sync_all`), as a batched sweep does for its configs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        tmp.replace(path)
        if durable:
            _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def sync_all() -> None:
    """Flush every written file to disk at once (one `sync` instead of an fsync per file and folder)."""
    if hasattr(os, "sync"):
        os.sync()


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield a fresh, uniquely named temporary folder beside `path`, renamed to `path` when the body succeeds (call it
    under `locked(path)` and check `path` first: the rename fails if another process already built it). The temporary
    folder is removed whatever happens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
        tmp.replace(path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- verified entries
HASH_KEY = "krea_sweeps.sha256"


def tensors_digest(tensors: dict) -> str:
    """sha256 over names, dtypes, shapes and bytes of torch tensors, in name order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_verified(path: Path, tensors: dict) -> None:
    """Write `tensors` (torch) as a safetensors file carrying its own content hash; locked and atomic."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with locked(path), atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata={HASH_KEY: tensors_digest(tensors)})


def load_verified(path: Path, device: str = "cpu") -> dict | None:
    """The tensors of a file written by `save_verified`, or None when it is missing or damaged (unreadable, or its
    content no longer matches its hash: a one-line warning, and the caller recomputes and rewrites it)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            expected = (f.metadata() or {}).get(HASH_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated, zeroed, not safetensors at all
        log.warning("cache entry %s is unreadable (%s): recomputing it", path, str(e).splitlines()[0][:120])
        return None
    if expected is None or tensors_digest(tensors) != expected:
        log.warning("cache entry %s does not match its content hash (damaged): recomputing it", path)
        return None
    return {k: v.to(device) for k, v in tensors.items()} if device != "cpu" else tensors


# ------------------------------------------------------------------------------------------------ file identity
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".gguf")


def file_identity(path: str | Path | None) -> dict | list | None:
    """What a replaced checkpoint changes: size, mtime and (for safetensors) a hash of the header, which lists every
    tensor's name, dtype, shape and offsets. A folder is the list of its weight and config files' identities.
    Cheap (reads the header only) and memoised per (path, size, mtime)."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
        return [{"file": str(p.relative_to(path)), **_one_file_identity(p)} for p in files]
    if path.is_file():
        return _one_file_identity(path)
    return None


def _one_file_identity(path: Path) -> dict:
    st = path.stat()
    return dict(_file_identity_at(str(path), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=4096)
def _file_identity_at(path: str, size: int, mtime_ns: int) -> dict:
    """A pure function of the file's bytes at (size, mtime): memoised like any pure function, not state."""
    out = {"size": size, "mtime_ns": mtime_ns}
    if path.endswith(".safetensors"):
        out["header_sha256"] = _safetensors_header_digest(Path(path))
    return out


def _safetensors_header_digest(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                return None
            header = f.read(n)
        return hashlib.sha256(header).hexdigest()
    except (OSError, struct.error):
        return None


def digest_json(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def config_yaml(node) -> str:
    """`OmegaConf.to_yaml(node)`, byte for byte, through libyaml's emitter when PyYAML has it (3–4× faster: the job
    and Hydra records of every job are written with it). The string representer is OmegaConf's own: strings that
    read as bools or numbers are quoted."""
    import yaml
    from omegaconf import OmegaConf

    dumper = _libyaml_dumper()
    if dumper is None:
        return OmegaConf.to_yaml(node)
    data = OmegaConf.to_container(node, resolve=False, enum_to_str=True)
    return yaml.dump(data, Dumper=dumper, default_flow_style=False, allow_unicode=True, sort_keys=False)


@functools.lru_cache(maxsize=1)
def _libyaml_dumper():
    import yaml
    from omegaconf._utils import OmegaConfDumper

    if not getattr(yaml, "__with_libyaml__", False):
        return None

    class Dumper(yaml.CSafeDumper):
        pass

    Dumper.add_representer(str, OmegaConfDumper.str_representer)
    return Dumper


def clear_job_folder(job_dir: Path) -> None:
    """Remove everything an earlier run of this job left (result, arrays, images, figures, W&B runs, `.hydra/`);
    keep only the log file Hydra has open for this run."""
    if not job_dir.is_dir():
        return
    for entry in job_dir.iterdir():
        if entry.suffix == ".log" and entry.is_file():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
