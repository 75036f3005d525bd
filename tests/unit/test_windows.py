"""Token windows: packing, BOS, padding and the keep mask."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from resae_serve.errors import CaptureError
from resae_serve.windows import iter_token_windows


def _ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_packed_windows_start_with_bos_and_separate_docs_with_eos(
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    docs = ["w1 w2 w3", "w4 w5 w6"]  # 8 tokens with the two EOS
    batches = list(iter_token_windows(docs, tiny_tokenizer, context_size=4, batch_size=8))
    assert len(batches) == 1
    ids = batches[0].input_ids
    bos, eos, pad = (tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id,
                     tiny_tokenizer.pad_token_id)
    stream = [*_ids(tiny_tokenizer, docs[0]), eos, *_ids(tiny_tokenizer, docs[1]), eos]
    assert ids[:, 0].tolist() == [bos] * 3
    assert ids[0, 1:].tolist() == stream[0:3]
    assert ids[1, 1:].tolist() == stream[3:6]
    assert ids[2, 1:3].tolist() == stream[6:8] and ids[2, 3].item() == pad
    assert batches[0].attention_mask[2].tolist() == [1, 1, 1, 0]
    assert batches[0].keep[2].tolist() == [False, True, True, False]
    assert batches[0].window_index.tolist() == [0, 1, 2]


def test_unpacked_windows_pad_each_document(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    docs = ["w1 w2 w3 w4 w5", "w6"]
    batches = list(iter_token_windows(docs, tiny_tokenizer, context_size=4, batch_size=2,
                                      pack=False, skip_bos=False))
    assert [len(b.input_ids) for b in batches] == [2, 1]
    keep = torch.cat([b.keep for b in batches])
    assert keep.sum(1).tolist() == [4, 3, 2]  # BOS kept when skip_bos=False
    assert torch.cat([b.window_index for b in batches]).tolist() == [0, 1, 2]


def test_without_bos_every_real_position_is_kept(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    (batch,) = iter_token_windows(["w1 w2 w3"], tiny_tokenizer, context_size=4, batch_size=4,
                                  prepend_bos=False)
    assert batch.input_ids[0, 0].item() != tiny_tokenizer.bos_token_id
    assert batch.keep.tolist() == [[True, True, True, True]]  # three words + EOS


@pytest.mark.parametrize(("context_size", "batch_size", "field"),
                         [(1, 4, "context_size=1"), (8, 0, "batch_size=0")])
def test_bad_sizes_name_the_field(
    tiny_tokenizer: PreTrainedTokenizerFast, context_size: int, batch_size: int, field: str
) -> None:
    with pytest.raises(CaptureError, match=field):
        list(iter_token_windows(["w1"], tiny_tokenizer, context_size=context_size,
                                batch_size=batch_size))
