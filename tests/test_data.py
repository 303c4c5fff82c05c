"""Section 5 (DATA): challenge shards, the sequential train stream, rank slicing, validation tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import build_dataset
import train_gpt
from train_gpt import TokenStream, TrainBatches, read_shard


def write_shards(directory: Path, split: str, sizes: list[int], start: int = 0) -> np.ndarray:
    """Write consecutive shards whose tokens are their stream positions (+start); return all tokens in order."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens = (np.arange(sum(sizes)) + start).astype(np.uint16)
    offset = 0
    for i, n in enumerate(sizes):
        build_dataset.write_shard(directory / f"fineweb_{split}_{i:06d}.bin", tokens[offset:offset + n])
        offset += n
    return tokens


# --- read_shard ---


def test_read_shard_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 65536, size=1000, dtype=np.uint16)
    path = tmp_path / "fineweb_train_000000.bin"
    assert build_dataset.write_shard(path, tokens) == 1000
    got = read_shard(path)
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, tokens)
    # The two readers agree (the builder's own reader validates the same format).
    np.testing.assert_array_equal(got, build_dataset.read_shard(path))


def test_read_shard_empty_shard(tmp_path):
    path = tmp_path / "empty.bin"
    build_dataset.write_shard(path, np.zeros(0, dtype=np.uint16))
    assert read_shard(path).size == 0


def _valid_shard_bytes(n: int = 10) -> tuple[bytearray, np.ndarray]:
    header = build_dataset.shard_header(n)
    body = np.arange(n, dtype="<u2")
    return bytearray(header.tobytes() + body.tobytes()), body


@pytest.mark.parametrize("corrupt", ["magic", "version", "truncated", "extra", "short_header", "empty", "count"])
def test_read_shard_rejects_bad_files_naming_the_path(tmp_path, corrupt):
    data, _ = _valid_shard_bytes(10)
    if corrupt == "magic":
        data[0:4] = np.array([20240521], dtype="<i4").tobytes()
    elif corrupt == "version":
        data[4:8] = np.array([2], dtype="<i4").tobytes()
    elif corrupt == "truncated":
        data = data[:-2]  # one token missing
    elif corrupt == "extra":
        data += b"\x00\x00"  # one token too many
    elif corrupt == "short_header":
        data = data[:500]
    elif corrupt == "empty":
        data = bytearray()
    elif corrupt == "count":
        data[8:12] = np.array([11], dtype="<i4").tobytes()  # header claims one more token than the body holds
    path = tmp_path / f"bad_{corrupt}.bin"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as err:
        read_shard(path)
    assert str(path) in str(err.value)


# --- shard_paths ---


def test_shard_paths_sorted_and_split(tmp_path):
    write_shards(tmp_path, "train", [3, 3, 3])
    write_shards(tmp_path, "val", [4])
    (tmp_path / "notes.txt").write_text("x")
    train = train_gpt.shard_paths(str(tmp_path), "train")
    assert [p.name for p in train] == [f"fineweb_train_{i:06d}.bin" for i in range(3)]
    assert [p.name for p in train_gpt.shard_paths(str(tmp_path), "val")] == ["fineweb_val_000000.bin"]


def test_shard_paths_error_when_no_shards(tmp_path):
    write_shards(tmp_path, "train", [3])
    with pytest.raises(FileNotFoundError) as err:
        train_gpt.shard_paths(str(tmp_path), "val")
    assert "val" in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(FileNotFoundError):
        train_gpt.shard_paths(str(tmp_path / "missing"), "train")


# --- TokenStream ---


def test_token_stream_crosses_shards_and_wraps(tmp_path):
    sizes = [10, 7, 1, 5]
    tokens = write_shards(tmp_path, "train", sizes)
    stream = TokenStream(train_gpt.shard_paths(str(tmp_path), "train"))
    total = len(tokens)
    endless = np.tile(tokens, 20)
    pos = 0
    for n in [3, 8, 6, 4, 1, 23, 2, 50, 7, 1, total, 5]:
        got = stream.take(n)
        assert len(got) == n
        np.testing.assert_array_equal(got, endless[pos:pos + n])
        pos += n
    assert pos > 3 * total  # it wrapped several times


def test_token_stream_wraps_to_the_first_shard(tmp_path):
    tokens = write_shards(tmp_path, "train", [4, 4])
    stream = TokenStream(train_gpt.shard_paths(str(tmp_path), "train"))
    np.testing.assert_array_equal(stream.take(8), tokens)
    np.testing.assert_array_equal(stream.take(3), tokens[:3])
    assert stream.file_index == 0


def test_token_stream_skips_an_empty_shard(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    build_dataset.write_shard(tmp_path / "fineweb_train_000000.bin", np.array([1, 2, 3], dtype=np.uint16))
    build_dataset.write_shard(tmp_path / "fineweb_train_000001.bin", np.zeros(0, dtype=np.uint16))
    build_dataset.write_shard(tmp_path / "fineweb_train_000002.bin", np.array([4, 5], dtype=np.uint16))
    stream = TokenStream(train_gpt.shard_paths(str(tmp_path), "train"))
    np.testing.assert_array_equal(stream.take(7), [1, 2, 3, 4, 5, 1, 2])


# --- TrainBatches ---


@pytest.mark.parametrize("world", [1, 2, 4])
def test_train_batches_rank_slices(tmp_path, world):
    seq, rows = 4, 3
    local = seq * rows
    span = local + 1
    sizes = [37, 50, 29, 61]  # uneven shards so spans straddle shard edges; 177 tokens, wraps for world 4
    tokens = write_shards(tmp_path, "train", sizes)
    paths = train_gpt.shard_paths(str(tmp_path), "train")
    endless = np.tile(tokens, 10).astype(np.int64)
    # Every rank advances its own identical copy of the stream (as in torchrun).
    loaders = [TrainBatches(TokenStream(paths), r, world, local, seq, torch.device("cpu")) for r in range(world)]
    for call in range(6):
        chunk_start = call * span * world
        pieces = []
        for r, loader in enumerate(loaders):
            x, y = loader.next()
            assert x.shape == (rows, seq) and y.shape == (rows, seq)
            assert x.dtype == torch.int64 and y.dtype == torch.int64
            flat_x, flat_y = x.reshape(-1).numpy(), y.reshape(-1).numpy()
            # x/y are the one-token shift of one contiguous span of local+1 tokens.
            np.testing.assert_array_equal(flat_x[1:], flat_y[:-1])
            rank_span = np.concatenate([flat_x, flat_y[-1:]])
            start = chunk_start + r * span
            np.testing.assert_array_equal(rank_span, endless[start:start + span])
            pieces.append(rank_span)
        # Ranks of one step are disjoint and together cover the step's chunk of the stream exactly.
        np.testing.assert_array_equal(np.concatenate(pieces), endless[chunk_start:chunk_start + span * world])


def test_train_batches_match_spec_volume(tmp_path):
    # Consecutive calls advance the shared stream by span x world tokens: check with an independent stream.
    write_shards(tmp_path, "train", [1000])
    paths = train_gpt.shard_paths(str(tmp_path), "train")
    loader = TrainBatches(TokenStream(paths), 1, 2, 8, 4, torch.device("cpu"))
    for call in range(3):
        x, _ = loader.next()
        assert int(x[0, 0]) == call * 9 * 2 + 9


def independent_stream(paths: list[Path]) -> np.ndarray:
    """The train stream read without train_gpt: each file's bytes after the 1024-byte header, in name order."""
    return np.concatenate([np.frombuffer(p.read_bytes()[1024:], dtype="<u2") for p in sorted(paths)]).astype(np.int64)


@pytest.mark.parametrize("world", [1, 8])
def test_prefetched_batches_equal_an_independent_read_across_shards_and_a_resume(tmp_path, world):
    """The token stream a run consumes, prefetching included: micro-step k of rank r is tokens
    [k*W*S + r*S, ... + S) of the endless stream (S = local + 1), across shard edges, wrap-around, and a loader
    resumed from the `position` a checkpoint saves (the worker has already read one batch past it)."""
    seq, rows = 4, 2
    span = seq * rows + 1
    paths = [tmp_path / f"fineweb_train_{i:06d}.bin" for i in range(3)]
    rng = np.random.default_rng(world)
    for path, size in zip(paths, [97, 40, 131]):  # spans straddle every shard edge; the stream wraps for world 8
        build_dataset.write_shard(path, rng.integers(0, 1024, size=size, dtype=np.uint16))
    endless = np.tile(independent_stream(paths), 40)
    for rank in sorted({0, world - 1}):
        loader = TrainBatches(TokenStream(paths), rank, world, seq * rows, seq, torch.device("cpu"))
        for step in range(30):
            if step == 17:  # a checkpoint's stream position, then a fresh loader (as RESUME builds one) seeks to it
                loader.pending.result()  # the worker has read the next batch: the stream is one batch ahead
                assert (loader.stream.file_index, loader.stream.offset) != loader.position
                position = loader.position
                loader = TrainBatches(TokenStream(paths), rank, world, seq * rows, seq, torch.device("cpu"))
                loader.seek(*position)
            x, y = loader.next()
            start = (step * world + rank) * span
            np.testing.assert_array_equal(x.reshape(-1).numpy(), endless[start:start + span - 1])
            np.testing.assert_array_equal(y.reshape(-1).numpy(), endless[start + 1:start + span])
        assert 30 * world * span > 2 * len(independent_stream(paths)) or world == 1


def test_read_shard_is_a_read_only_memory_map(tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    build_dataset.write_shard(path, np.arange(100, dtype=np.uint16))
    tokens = read_shard(path)
    assert isinstance(tokens, np.memmap) and not tokens.flags.writeable


# --- validation tokens ---


@pytest.fixture
def val_cfg(tiny_cfg):
    return lambda data_path, **kw: tiny_cfg(data_path=str(data_path), **kw)


def test_load_val_tokens_truncates_to_whole_blocks_plus_one(tmp_path, val_cfg):
    tokens = write_shards(tmp_path, "val", [40, 30, 31], start=100)  # 101 tokens in 3 shards
    cfg = val_cfg(tmp_path, train_seq_len=16)
    val = train_gpt.load_val_tokens(cfg)
    assert val.dtype == torch.int64
    assert len(val) == (101 - 1) // 16 * 16 + 1 == 97
    np.testing.assert_array_equal(val.numpy(), tokens[:97])


def test_load_val_tokens_exact_fit_keeps_everything(tmp_path, val_cfg):
    tokens = write_shards(tmp_path, "val", [33])  # 2 blocks of 16 + 1 target
    val = train_gpt.load_val_tokens(val_cfg(tmp_path, train_seq_len=16))
    np.testing.assert_array_equal(val.numpy(), tokens)


def test_load_val_tokens_cap(tmp_path, val_cfg):
    tokens = write_shards(tmp_path, "val", [60, 41])
    val = train_gpt.load_val_tokens(val_cfg(tmp_path, train_seq_len=16, val_max_tokens=40))
    assert len(val) == 33  # 41 tokens kept, 40 targets -> 2 whole blocks of 16 + 1
    np.testing.assert_array_equal(val.numpy(), tokens[:33])
    val = train_gpt.load_val_tokens(val_cfg(tmp_path, train_seq_len=16, val_max_tokens=48))
    np.testing.assert_array_equal(val.numpy(), tokens[:49])
    # A cap past the split changes nothing.
    val = train_gpt.load_val_tokens(val_cfg(tmp_path, train_seq_len=16, val_max_tokens=10_000))
    assert len(val) == 97


def test_load_val_tokens_too_short(tmp_path, val_cfg):
    write_shards(tmp_path, "val", [16])  # 15 targets < one block
    with pytest.raises(ValueError, match="TRAIN_SEQ_LEN"):
        train_gpt.load_val_tokens(val_cfg(tmp_path, train_seq_len=16))


def test_load_val_tokens_on_the_demo_subset(demo_subset, val_cfg):
    cfg = val_cfg(demo_subset["data_path"], train_seq_len=64)
    val = train_gpt.load_val_tokens(cfg)
    raw = np.concatenate([read_shard(p) for p in train_gpt.shard_paths(demo_subset["data_path"], "val")])
    assert (len(val) - 1) % 64 == 0 and 0 <= len(raw) - len(val) < 64
    np.testing.assert_array_equal(val.numpy(), raw[:len(val)])
    assert int(val[0]) == 1  # the split starts with a document's BOS
