"""Where resae-serve keeps fetched models, corpora and downloads.

The root is ``$RESAE_CACHE`` when set, else ``$XDG_CACHE_HOME/resae``, else ``~/.cache/resae``.
Everything under it can be deleted; ``resae fetch`` rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CACHE_ENV = "RESAE_CACHE"
CHECKSUMS_FILE = "checksums.json"


def cache_root() -> Path:
    """Return the cache root folder (not created)."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "resae"


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder under the cache root."""
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``final`` only if the block succeeds.

    An interrupted fetch or conversion therefore never leaves a half-written folder where a
    complete one is expected.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_checksums(folder: Path, extra: dict[str, object] | None = None) -> dict[str, str]:
    """Record the SHA-256 of every file in ``folder`` into ``checksums.json``."""
    sums = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != CHECKSUMS_FILE
    }
    payload = {"files": sums, **(extra or {})}
    (folder / CHECKSUMS_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return sums


def verify_checksums(folder: Path, *, full: bool = False) -> list[str]:
    """Return the problems found in a folder written with :func:`write_checksums`.

    Without ``full`` only presence is checked (fast, for every start-up); with ``full`` every
    file is hashed again.
    """
    record = folder / CHECKSUMS_FILE
    if not record.is_file():
        return [f"{record} is missing"]
    try:
        sums: dict[str, str] = json.loads(record.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return [f"{record} is unreadable ({exc})"]
    problems = []
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif full and sha256_file(path) != expected:
            problems.append(f"{path} has SHA-256 {sha256_file(path)}, expected {expected}")
    return problems
