"""Section 6 (BYTES): SentencePiece byte tables, per-target byte counts and the bits-per-byte meter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sentencepiece
import torch

import train_gpt
from train_gpt import BpbMeter, build_byte_tables, target_bytes


@pytest.fixture(scope="module")
def sp(demo_subset):
    return sentencepiece.SentencePieceProcessor(model_file=demo_subset["tokenizer_path"])


@pytest.fixture(scope="module")
def tables(sp, demo_subset):
    return build_byte_tables(sp, demo_subset["vocab_size"])


def counted_bytes(ids: list[int], sp, tables) -> int:
    """Bytes the metric assigns to one document shard-encoded as BOS + ids (every id is a scored target)."""
    seq = torch.tensor([sp.bos_id()] + ids, dtype=torch.int64)
    return int(target_bytes(seq[:-1], seq[1:], tables).sum())


# --- tables ---


def test_table_shapes_and_dtypes(tables, sp):
    assert sp.vocab_size() == 512
    for t in (tables.base_bytes, tables.has_space, tables.is_boundary):
        assert t.shape == (512,)
    assert tables.base_bytes.dtype == torch.int32
    assert tables.has_space.dtype == torch.bool and tables.is_boundary.dtype == torch.bool


def test_control_and_unknown_ids_are_zero_byte_boundaries(tables, sp):
    specials = [i for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)]
    assert sorted(specials) == [0, 1, 2, 3]  # pad, bos, eos, unk as the challenge tokenizers define them
    for i in specials:
        assert tables.is_boundary[i] and tables.base_bytes[i] == 0 and not tables.has_space[i]
    assert int(tables.is_boundary.sum()) == len(specials)  # and nothing else is a boundary


def test_byte_fallback_pieces_are_one_byte(tables, sp):
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert len(byte_ids) == 256
    for i in byte_ids:
        assert sp.id_to_piece(i).startswith("<0x")
        assert tables.base_bytes[i] == 1 and not tables.has_space[i] and not tables.is_boundary[i]


def test_space_prefixed_pieces(tables, sp):
    seen = 0
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        piece = sp.id_to_piece(i)
        assert bool(tables.has_space[i]) == piece.startswith("\u2581")
        assert int(tables.base_bytes[i]) == len(piece.removeprefix("\u2581").encode("utf-8"))
        seen += piece.startswith("\u2581")
    assert seen > 50
    the = sp.piece_to_id("\u2581the")
    assert tables.has_space[the] and tables.base_bytes[the] == 3


def test_ids_past_the_tokenizer_vocab_are_boundaries(sp):
    big = build_byte_tables(sp, 600)
    assert big.base_bytes.shape == (600,)
    assert big.is_boundary[512:].all() and (big.base_bytes[512:] == 0).all() and not big.has_space[512:].any()


def test_target_bytes_space_rule(tables, sp):
    the, a = sp.piece_to_id("\u2581the"), sp.piece_to_id("a")
    bos = sp.bos_id()
    prev = torch.tensor([a, bos, 3, a])
    target = torch.tensor([the, the, the, a])
    # after a normal token the space counts; after BOS or <unk> it does not
    assert target_bytes(prev, target, tables).tolist() == [4, 3, 3, 1]
    assert target_bytes(prev, target, tables).dtype == torch.int32


# --- the key test: bytes counted from tokens equal the UTF-8 bytes of the text the tokens stand for ---
#
# Why compare against sp.decode(ids) and not the raw document:
# * The tokenizer normalises with nmt_nfkc and remove_extra_whitespaces: e.g. NFKC folds full-width letters
#   and ligatures, and runs of whitespace collapse to one space. The tokens (and so the metric) describe the
#   normalised text; sp.decode(ids) is exactly that text, while the raw text can have a different byte length.
# * The first piece of a document follows BOS, a boundary token, so a leading U+2581 would count no space
#   byte; SentencePiece's decode likewise drops the leading U+2581 of the first piece (it also strips leading
#   whitespace at encode time, so real documents never start with one). Both sides agree, so the comparison
#   is exact: no off-by-one per document.
# * Control tokens decode to nothing and count 0 bytes; byte-fallback pieces decode to their byte and count 1
#   (runs of them reassemble into the original UTF-8 characters). <unk> would decode to " \u2047 " while
#   counting 0 bytes, so the test first checks that no <unk> occurs (the tokenizer has byte fallback).


def test_val_documents_byte_count_matches_decoded_text(sp, tables, demo_subset):
    assert len(demo_subset["val_texts"]) == 3
    for text in demo_subset["val_texts"]:
        ids = sp.encode(text, out_type=int)
        assert sp.unk_id() not in ids
        decoded = sp.decode(ids)
        assert counted_bytes(ids, sp, tables) == len(decoded.encode("utf-8"))


def test_val_documents_use_byte_fallback_and_space_pieces(sp, demo_subset):
    # Guard that the key test exercises every table path on real data.
    ids = [i for text in demo_subset["val_texts"] for i in sp.encode(text, out_type=int)]
    assert any(sp.is_byte(i) for i in ids)
    assert any(sp.id_to_piece(i).startswith("\u2581") for i in ids)
    assert any(not sp.is_byte(i) and not sp.id_to_piece(i).startswith("\u2581") for i in ids)


@pytest.mark.parametrize("text", [
    "  leading and trailing spaces   and   runs  ",
    "Ｆｕｌｌ－ｗｉｄｔｈ ＡＢＣ and the ﬁ ligature, ① and ½",
    "Emoji \U0001F600 and CJK \u4e2d\u6587 and accents: caf\u00e9 na\u00efve \u00c5ngstr\u00f6m",
    "tabs\tand\nnew\nlines\r\nand a non\u2011breaking\u00a0space",
    "digits 1234567890 split one by one; 3.14159",
])
def test_synthetic_texts_byte_count_matches_decoded_text(sp, tables, text):
    ids = sp.encode(text, out_type=int)
    assert sp.unk_id() not in ids
    assert counted_bytes(ids, sp, tables) == len(sp.decode(ids).encode("utf-8"))


def test_normalisation_changes_bytes_so_raw_text_is_the_wrong_reference(sp, tables):
    text = "ＡＢＣ"  # 9 UTF-8 bytes, NFKC -> "ABC"
    ids = sp.encode(text, out_type=int)
    assert counted_bytes(ids, sp, tables) == 3 != len(text.encode("utf-8"))


def test_leading_space_piece_after_bos_counts_no_space(sp, tables):
    the = sp.piece_to_id("\u2581the")
    assert sp.decode([the]) == "the"
    assert counted_bytes([the], sp, tables) == 3
    assert counted_bytes([the, the], sp, tables) == len(sp.decode([the, the]).encode()) == 7


def test_val_shard_byte_count_is_the_sum_over_documents(sp, tables, demo_subset):
    shard = np.concatenate([train_gpt.read_shard(p) for p in train_gpt.shard_paths(demo_subset["data_path"], "val")])
    tokens = torch.from_numpy(shard.astype(np.int64))
    # The shard is exactly BOS + ids per document, in order.
    expected_ids = []
    for text in demo_subset["val_texts"]:
        expected_ids += [sp.bos_id()] + sp.encode(text, out_type=int)
    assert tokens.tolist() == expected_ids
    # A document's BOS is itself a target (0 bytes) and makes the next document's first space uncounted.
    total = int(target_bytes(tokens[:-1], tokens[1:], tables).sum())
    per_doc = sum(len(sp.decode(sp.encode(t, out_type=int)).encode("utf-8")) for t in demo_subset["val_texts"])
    assert total == per_doc


# --- BpbMeter ---


def test_bpb_meter_math():
    meter = BpbMeter(torch.device("cpu"))
    meter.add(torch.tensor(10.0), 4, torch.tensor(12, dtype=torch.int32))
    meter.add(torch.tensor([2.5, 3.5]).sum(), torch.tensor(6), torch.tensor([3, 5]).sum())
    loss, bpb = meter.result()
    assert loss == pytest.approx(16.0 / 10)
    assert bpb == pytest.approx(16.0 / (math.log(2) * 20))
    assert bpb == pytest.approx(loss / math.log(2) * 10 / 20)  # (loss / ln 2) x tokens / bytes


def test_bpb_meter_nothing_scored_is_nan():
    loss, bpb = BpbMeter(torch.device("cpu")).result()
    assert math.isnan(loss) and math.isnan(bpb)
    meter = BpbMeter(torch.device("cpu"))
    meter.add(torch.tensor(1.0), 1, torch.tensor(0))  # only zero-byte targets (e.g. BOS)
    assert math.isnan(meter.result()[1])


def test_bpb_meter_accumulates_in_float64():
    meter = BpbMeter(torch.device("cpu"))
    assert meter.sums.dtype == torch.float64
    meter.add(torch.tensor(2.0**24, dtype=torch.float32), 2**24, torch.tensor(2**24, dtype=torch.int32))
    for _ in range(3):
        meter.add(torch.tensor(1.0, dtype=torch.float32), 1, torch.tensor(1, dtype=torch.int32))
    nll, tokens, nbytes = meter.sums.tolist()
    assert nll == 2**24 + 3 and tokens == 2**24 + 3 and nbytes == 2**24 + 3  # float32 would stall at 2**24
    assert meter.result()[0] == 1.0


def test_bpb_meter_reduce_single_process(tmp_path, monkeypatch, tiny_cfg):
    monkeypatch.chdir(tmp_path)
    rt = train_gpt.Runtime(tiny_cfg(), {})
    meter = BpbMeter(rt.device)
    meter.add(torch.tensor(3.0), 2, torch.tensor(4))
    assert meter.reduce(rt) is meter
    assert meter.result() == (1.5, pytest.approx(3.0 / (math.log(2) * 4)))
