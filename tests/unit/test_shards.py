"""Shard folders round-trip exactly and refuse damaged contents with the file named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from resae_serve.capture import ActivationBatch
from resae_serve.errors import ShardError
from resae_serve.shards import INDEX_FILE, read_index, read_shards, write_shards
from resae_serve.shuffle import shuffled


def _batches(n_batches: int = 5, n: int = 7, dtype: torch.dtype = torch.float32) -> list[
    ActivationBatch
]:
    g = torch.Generator().manual_seed(0)
    return [
        ActivationBatch(
            acts=torch.randn(n, 2, 6, generator=g).to(dtype),
            token_ids=torch.randint(100, (n,), generator=g),
            window=torch.full((n,), i),
            position=torch.arange(n),
        )
        for i in range(n_batches)
    ]


def _cat(batches: list[ActivationBatch]) -> ActivationBatch:
    return ActivationBatch(*(torch.cat(f) for f in zip(*batches, strict=True)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    batches = _batches(dtype=dtype)
    index = write_shards(batches, tmp_path / "s", layers=(3, 9), tokens_per_shard=10,
                         metadata={"model": "tiny"})
    assert [s["n_tokens"] for s in index["shards"]] == [10, 10, 10, 5]
    assert read_index(tmp_path / "s")["metadata"] == {"model": "tiny"}
    back = _cat(list(read_shards(tmp_path / "s")))
    for got, want in zip(back, _cat(batches), strict=True):
        assert torch.equal(got, want)
    assert back.acts.dtype == dtype


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    write_shards(_batches(), tmp_path, layers=(3, 9))
    with pytest.raises(ShardError, match="already holds shards"):
        write_shards(_batches(), tmp_path, layers=(3, 9))


def test_missing_index_and_missing_shard(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=r"shards\.json not found"):
        list(read_shards(tmp_path))
    write_shards(_batches(), tmp_path, layers=(3, 9), tokens_per_shard=10)
    (tmp_path / "shard-00001.safetensors").unlink()
    with pytest.raises(ShardError, match="shard-00001"):
        list(read_shards(tmp_path))


def test_index_disagreeing_with_shard_is_refused(tmp_path: Path) -> None:
    write_shards(_batches(), tmp_path, layers=(3, 9), tokens_per_shard=10)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["d_model"] = 7
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ShardError, match=r"shard-00000.*shape \(10, 2, 6\).*\(10, 2, 7\)"):
        list(read_shards(tmp_path))
    index["schema_version"] = 99
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ShardError, match="schema_version=99"):
        read_index(tmp_path)


def test_shuffle_keeps_every_row_once_and_is_seeded() -> None:
    batches = _batches(n_batches=10)
    out1 = _cat(list(shuffled(iter(batches), capacity=16, seed=1)))
    out2 = _cat(list(shuffled(iter(batches), capacity=16, seed=1)))
    ref = _cat(batches)
    assert torch.equal(out1.acts, out2.acts)
    assert not torch.equal(out1.acts, ref.acts)
    # every (window, position) pair appears exactly once, rows stay aligned
    pairs = sorted(zip(out1.window.tolist(), out1.position.tolist(), strict=True))
    assert pairs == sorted(zip(ref.window.tolist(), ref.position.tolist(), strict=True))
    order = (ref.window * 100 + ref.position).argsort()
    back = (out1.window * 100 + out1.position).argsort()
    assert torch.equal(out1.acts[back], ref.acts[order])
