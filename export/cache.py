"""Exports built on demand for serving, and the check that an export fits its dictionary.

Serving a dictionary folder with an ONNX runtime exports it once into the resae cache::

    <resae cache>/exports/<first 16 hex digits of the fingerprint>-v<EXPORT_SCHEMA_VERSION>/

keyed by :func:`~export.folder.dictionary_fingerprint` (the dictionary's content, not its
path), so a retrained dictionary gets a new export and an unchanged one is never exported
twice. The export is validated against the torch ``ReSAE`` before it is published, written in a
private temporary folder and published with one ``rename`` (under a lock file, so concurrent
servers build it once; a reader never sees half an export). An export folder, cached or given,
whose layers, widths or fingerprint do not match the dictionary served is refused with a
message naming the field (:func:`check_export_matches`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from resae_serve.artifact import load_artifact
from resae_serve.cache import cache_dir
from resae_serve.resae import ReSAE

from .convert import export_artifact
from .errors import ExportError
from .folder import ExportManifest, dictionary_fingerprint, read_export_manifest
from .graphs import dictionary_layout
from .spec import EXPORT_MANIFEST, EXPORT_SCHEMA_VERSION, ExportConfig
from .validate import validate_export

logger = logging.getLogger(__name__)

EXPORTS = "exports"
"""Sub-folder of the resae cache holding the exports built for serving."""


class StaleExportError(ExportError):
    """An export folder does not hold the dictionary being served."""


def cache_key(fingerprint: str) -> str:
    """Folder name of the cached export of dictionary ``fingerprint``."""
    return f"{fingerprint.split(':')[-1][:16]}-v{EXPORT_SCHEMA_VERSION}"


def check_export_matches(manifest: ExportManifest, resae: ReSAE, *,
                         model_fingerprint: str | None = None,
                         fingerprint: str | None = None) -> None:
    """Refuse an export whose layout (mode, layers, d_model, widths, k, architectures),
    dictionary fingerprint or model fingerprint differ from ``resae``'s (and the model's),
    naming the manifest field. ``fingerprint``: ``resae``'s, when already computed."""
    want = dictionary_layout(resae).to_dict()
    have = manifest.layout.to_dict()
    where = manifest.folder / EXPORT_MANIFEST
    for name, value in want.items():
        if have.get(name) != value:
            raise StaleExportError(
                f"{where}: field 'layout.{name}' is {have.get(name)!r}, but the dictionary "
                f"served has {value!r}; this export is of another dictionary (export it again, "
                "or serve the dictionary folder and let the server export it)")
    fingerprint = fingerprint or dictionary_fingerprint(resae)
    if manifest.fingerprint != fingerprint:
        raise StaleExportError(
            f"{where}: field 'fingerprint' is {manifest.fingerprint}, but the dictionary "
            f"served is {fingerprint} (same shapes, other weights); export it again")
    recorded = str((manifest.artifact.get("model") or {}).get("fingerprint") or "")
    if model_fingerprint and recorded and recorded != model_fingerprint:
        raise StaleExportError(
            f"{where}: field 'artifact.model.fingerprint' is {recorded}, but the dictionary "
            f"was trained on {model_fingerprint}; export it again")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created), held for the block: one builder at a time."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_export(dictionary: Path, *, root: Path | None = None,
                  resae: ReSAE | None = None) -> ExportManifest:
    """The export of the dictionary folder ``dictionary`` from the cache, built (exported
    and validated) on first use; refused when the cached folder does not match."""
    dictionary = Path(dictionary)
    loaded, manifest = load_artifact(dictionary)
    resae = resae or loaded
    fingerprint = dictionary_fingerprint(resae)
    root = Path(root) if root is not None else cache_dir(EXPORTS)
    root.mkdir(parents=True, exist_ok=True)
    final = root / cache_key(fingerprint)
    if not (final / EXPORT_MANIFEST).is_file():
        with _locked(root / f".{final.name}.lock"):
            if not (final / EXPORT_MANIFEST).is_file():     # another process may have won
                _build(dictionary, resae, final)
    else:
        logger.info("using the cached export %s of dictionary %s", final, fingerprint[:19])
    found = read_export_manifest(final)
    try:
        check_export_matches(found, resae, model_fingerprint=manifest.model.fingerprint,
                             fingerprint=fingerprint)
    except StaleExportError as exc:
        raise StaleExportError(f"{exc}. It is a cached export: delete {final} to rebuild "
                               "it") from exc
    return found


def _build(dictionary: Path, resae: ReSAE, final: Path) -> None:
    started = time.monotonic()
    logger.info("exporting %s to ONNX for serving (once per dictionary; cached in %s)",
                dictionary, final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        out = tmp / "export"
        export_artifact(dictionary, out, ExportConfig())
        validate_export(out, resae)                  # strict: raises ParityError on a miss
        out.chmod(0o755)                             # mkdtemp's 0700 would hide it from others
        try:
            out.rename(final)                        # atomic; refuses an existing folder
        except OSError:
            if not (final / EXPORT_MANIFEST).is_file():
                if final.exists():                   # a broken leftover: replace it
                    shutil.rmtree(final)
                out.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported and validated in %.0f s: %s", time.monotonic() - started, final)
