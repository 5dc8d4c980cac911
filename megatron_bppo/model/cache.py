"""Atomic, marker-checked cache directories for prepared model files (tiny test checkpoints, SmolLM2).

A directory is built in a temporary sibling (:func:`new_tmp_dir`, ``.<name>.tmp-<pid>-<random>``), then a marker
file (:data:`MARKER_NAME`: kind, hash of the build arguments, list of files) is written last
(:func:`write_marker`), then the sibling is renamed into place (:func:`publish_dir`). A directory counts as
complete (:func:`is_complete`) only when its marker names the expected kind (and argument hash) and every listed
file exists, so an interrupted build never leaves a half directory that is taken as complete. Siblings left by
killed builds are deleted by the next build, and a non-empty directory without a marker is never replaced
(:func:`check_replaceable`).

Two fix-ups for saved Hugging Face directories: :func:`portable_tokenizer_class` (loadable by transformers 4.x
and 5.x) and :func:`fix_permissions` (every file readable as the umask allows).

Standard library only; cheap to import.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "MARKER_NAME",
    "args_hash",
    "check_replaceable",
    "fix_permissions",
    "is_complete",
    "new_tmp_dir",
    "portable_tokenizer_class",
    "publish_dir",
    "read_marker",
    "write_marker",
]

MARKER_NAME = ".megatron_bppo_complete.json"
# Bump when the build recipe changes, so old caches are rebuilt instead of silently reused.
_FORMAT_VERSION = 1


def args_hash(kind: str, args: dict[str, Any]) -> str:
    """sha256 (hex) of ``kind``, the format version and ``args`` (JSON with sorted keys)."""
    blob = json.dumps({"kind": kind, "format": _FORMAT_VERSION, "args": args}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_marker(path: Path) -> dict | None:
    """The marker of ``path`` as a dict, or None when it is missing or unreadable."""
    try:
        with open(path / MARKER_NAME) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_complete(path: Path, kind: str, args_hash: str | None = None) -> bool:
    """True when ``path`` holds a marker of ``kind`` (with ``args_hash`` if given) and every listed file exists."""
    marker = read_marker(Path(path))
    if not marker or marker.get("kind") != kind:
        return False
    if args_hash is not None and marker.get("args_hash") != args_hash:
        return False
    files = marker.get("files") or []
    return bool(files) and all((Path(path) / f).is_file() for f in files)


def write_marker(path: Path, kind: str, args_hash: str, args: dict[str, Any], extra: dict | None = None) -> None:
    """Write the marker of ``path`` (kind, hash, args, the files now in ``path``, ``extra``); call it last."""
    files = sorted(
        str(p.relative_to(path)) for p in Path(path).rglob("*") if p.is_file() and p.name != MARKER_NAME
    )
    marker = {"kind": kind, "args_hash": args_hash, "args": args, "files": files, **(extra or {})}
    tmp = Path(path) / (MARKER_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(marker, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(path) / MARKER_NAME)  # the marker is written last: its presence means "complete"


def check_replaceable(out: Path) -> None:
    """Refuse to replace a non-empty directory that has no marker (one these helpers did not build)."""
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a directory")
        if any(out.iterdir()) and read_marker(out) is None:
            raise FileExistsError(
                f"{out} exists, is not empty and has no {MARKER_NAME}; refusing to overwrite it. "
                "Pass an empty or new directory."
            )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp_dirs(out: Path) -> None:
    """Delete ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*`` siblings left by killed builds (dead pid)."""
    for p in out.parent.glob(f".{out.name}.*-*-*"):
        kind, _, rest = p.name[len(out.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _pid_alive(int(pid)) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def new_tmp_dir(out: Path) -> Path:
    """Create and return an empty sibling ``.<name>.tmp-<pid>-<random>`` of ``out`` to build in; first deletes the
    siblings left by builds whose process is gone."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def publish_dir(tmp: Path, out: Path, is_complete: Callable[[Path], bool]) -> Path:
    """Move the finished ``tmp`` to ``out``. If a concurrent builder already published a complete ``out``, keep
    that one. A stale ``out`` (other arguments, or no longer complete) is moved aside and deleted."""
    try:
        os.rename(tmp, out)  # atomic; succeeds when out is absent or an empty directory
        return out
    except OSError:
        pass
    if is_complete(out):
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    trash = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(out, trash)
    os.rename(tmp, out)
    shutil.rmtree(trash, ignore_errors=True)
    return out


def portable_tokenizer_class(path: Path) -> None:
    """transformers 5 writes ``"tokenizer_class": "TokenizersBackend"``, which 4.x cannot resolve; the 4.x/5.x
    common name for the same class is ``PreTrainedTokenizerFast``. Also drops load-time keys that 5.x leaks into
    the saved config (``is_local``, ``local_files_only``)."""
    cfg_path = path / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("tokenizer_class") == "TokenizersBackend":
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        for key in ("is_local", "local_files_only"):
            cfg.pop(key, None)
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def fix_permissions(path: Path) -> None:
    """safetensors writes model.safetensors with mode 0600; make every file readable like the others (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in Path(path).rglob("*"):
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)
