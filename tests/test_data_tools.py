"""Tests for the data tools in data/: build_dataset.py, prepare_demo.py and
cached_challenge_fineweb.py.

Everything runs on CPU with small synthetic corpora and real SentencePiece
training (vocab 400).  The one slow test, test_prepare_demo_end_to_end_SLOW,
builds the full demo dataset (~10 s on 2 cores).
"""

from __future__ import annotations

import json
import lzma
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
sys.path.insert(0, str(DATA))

import build_dataset as bd  # noqa: E402
import cached_challenge_fineweb as ccf  # noqa: E402

VOCAB = 400  # small but above the 260 byte/special pieces + the corpus' characters


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def synthetic_docs(n_docs: int, seed: int = 0) -> list[str]:
    """Deterministic English-looking documents (ASCII, single spaces, digits).

    Such text round-trips exactly through the tokenizer, which lets tests
    compare decoded shards with the source documents.
    """
    rng = random.Random(seed)
    syllables = ["ka", "to", "re", "mi", "sun", "lo", "ve", "an", "dor", "the", "qu", "ix", "pel", "ra"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)})
    docs = []
    for d in range(n_docs):
        sentences = []
        for _ in range(rng.randint(3, 12)):
            ws = [rng.choice(words) for _ in range(rng.randint(4, 14))]
            if rng.random() < 0.3:
                ws.insert(rng.randrange(len(ws)), str(rng.randint(0, 2025)))
            sentences.append(" ".join(ws).capitalize() + rng.choice([".", ".", "?", "!"]))
        docs.append(f"Doc {d}. " + " ".join(sentences))
    return docs


def write_jsonl(path: Path, docs: list[str], xz: bool = False) -> Path:
    payload = "".join(json.dumps({"text": t}) + "\n" for t in docs).encode()
    path.write_bytes(lzma.compress(payload) if xz else payload)
    return path


def split_on_bos(tokens: np.ndarray, bos: int = 1) -> list[np.ndarray]:
    starts = np.flatnonzero(tokens == bos)
    assert starts.size and starts[0] == 0, "stream must start with BOS"
    return np.split(tokens, starts[1:])


def read_split(ds_dir: Path, split: str) -> np.ndarray:
    files = sorted(ds_dir.glob(f"fineweb_{split}_*.bin"))
    return np.concatenate([bd.read_shard(f) for f in files])


# ---------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------


def test_write_shard_layout_byte_for_byte(tmp_path):
    tokens = [1, 0, 2, 1023, 65535, 300]
    path = tmp_path / "fineweb_train_000000.bin"
    assert bd.write_shard(path, tokens) == len(tokens)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * len(tokens)
    expected_header = (
        (20240520).to_bytes(4, "little")
        + (1).to_bytes(4, "little")
        + len(tokens).to_bytes(4, "little")
        + bytes(1024 - 12)
    )
    assert raw[:1024] == expected_header
    assert raw[1024:] == b"".join(t.to_bytes(2, "little") for t in tokens)
    assert bd.read_shard(path).tolist() == tokens


def test_write_shard_rejects_out_of_range_ids(tmp_path):
    with pytest.raises(ValueError):
        bd.write_shard(tmp_path / "x.bin", [1, 65536])
    with pytest.raises(ValueError):
        bd.write_shard(tmp_path / "x.bin", [-1])


def test_read_shard_detects_truncation(tmp_path):
    path = tmp_path / "s.bin"
    bd.write_shard(path, list(range(10)))
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError):
        bd.read_shard(path)


def test_shard_writer_cuts_stream_into_fixed_size_shards(tmp_path):
    writer = bd.ShardWriter(tmp_path, "train", shard_tokens=5)
    chunks = [np.arange(n, dtype=np.uint16) + 10 * i for i, n in enumerate([3, 4, 1, 6])]
    for c in chunks:
        writer.add(c)
    files = writer.close()
    assert files == [f"fineweb_train_{i:06d}.bin" for i in range(3)]
    sizes = [bd.read_shard(tmp_path / f).size for f in files]
    assert sizes == [5, 5, 4]
    assert writer.total_tokens == 14
    assert np.array_equal(read_split(tmp_path, "train"), np.concatenate(chunks))


# ---------------------------------------------------------------------------
# reading documents and tokenizer lines
# ---------------------------------------------------------------------------


def test_iter_documents_jsonl_xz_and_txt(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text('{"text": "first doc", "id": 1}\n\n{"text": "   "}\n{"text": "second\\ndoc"}\n')
    b = write_jsonl(tmp_path / "b.jsonl.xz", ["third"], xz=True)
    c = tmp_path / "c.txt"
    c.write_text("fourth line one\nfourth line two\n\n  \n\nfifth\r\n\n\n")
    assert list(bd.iter_documents([a, b, c])) == [
        "first doc",
        "second\ndoc",
        "third",
        "fourth line one\nfourth line two",
        "fifth",
    ]


EMAILS = "From: a\nSubject: one\n\nFirst paragraph.\n\nSecond paragraph.\n---\nFrom: b\n\nOnly one.\n---\n"


@pytest.mark.parametrize("suffix", ["", ".gz", ".xz", ".zst"])
def test_txt_separator_keeps_blank_lines_inside_documents(tmp_path, suffix):
    import gzip

    import zstandard

    path = tmp_path / f"mail.txt{suffix}"
    opener = {"": open, ".gz": gzip.open, ".xz": lzma.open, ".zst": zstandard.open}[suffix]
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(EMAILS)
    assert list(bd.iter_documents([path], "---")) == [
        "From: a\nSubject: one\n\nFirst paragraph.\n\nSecond paragraph.", "From: b\n\nOnly one."]
    assert list(bd.iter_documents([path], "file")) == [EMAILS.strip("\n")]
    # The default is unchanged: every blank line ends a document (5 here, separator lines included).
    assert list(bd.iter_documents([path])) == [
        "From: a\nSubject: one", "First paragraph.", "Second paragraph.\n---\nFrom: b", "Only one.\n---"]


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_jsonl_reads_like_plain(tmp_path, suffix):
    import gzip

    import zstandard

    docs = ["one", "two\n\nparas"]
    opener = {".gz": gzip.open, ".zst": zstandard.open}[suffix]
    with opener(tmp_path / f"c.jsonl{suffix}", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert list(bd.iter_documents([tmp_path / f"c.jsonl{suffix}"])) == docs


def test_cli_prints_the_training_command(tmp_path, capsys):
    corpus = tmp_path / "mail.txt.zst"
    import zstandard

    with zstandard.open(corpus, "wt", encoding="utf-8") as f:
        f.write("\n---\n".join(synthetic_docs(30)) + "\n")
    assert bd.main([str(corpus), "--name", "mail", "--val-docs", "3", "--output-root", str(tmp_path / "out"),
                    "--vocab-size", str(VOCAB), "--txt-separator=---"]) == 0  # "=": LINE starts with "-"
    out = capsys.readouterr().out
    command = re.search(r"^train on it \(8 GPUs\):  (.*)$", out, re.M).group(1)
    env = dict(item.split("=", 1) for item in command.split(" torchrun")[0].split())
    assert command.endswith("torchrun --standalone --nproc_per_node=8 train_gpt.py")
    assert Path(env["DATA_PATH"], "fineweb_val_000000.bin").is_file() and Path(env["TOKENIZER_PATH"]).is_file()
    assert env["VOCAB_SIZE"] == str(spm.SentencePieceProcessor(model_file=env["TOKENIZER_PATH"]).vocab_size())
    manifest = json.loads(Path(env["DATA_PATH"], "manifest.json").read_text())
    assert manifest["stats"]["docs_total"] == 30 and manifest["settings"]["txt_separator"] == "---"
    assert re.search(r"^or on CPU: +PRESET=demo DATA_PATH=\S+ TOKENIZER_PATH=\S+ VOCAB_SIZE=\d+ python3 train_gpt.py$",
                     out, re.M)


def test_iter_documents_rejects_bad_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(bd.BuildError, match="bad.jsonl:1"):
        list(bd.iter_documents([bad]))
    with pytest.raises(bd.BuildError, match="unsupported"):
        list(bd.iter_documents([tmp_path / "corpus.csv"]))


def test_split_for_tokenizer_sentences():
    text = 'He said "Stop." Then   he left! Did he?\n\nYes.  Mr. Smith stayed'
    assert bd.split_for_tokenizer(text) == [
        'He said "Stop."', "Then   he left!", "Did he?", "Yes.", "Mr.", "Smith stayed",
    ]


def test_split_for_tokenizer_keeps_lines_short_and_loses_no_text():
    rng = random.Random(1)
    long_sentence = " ".join("wörd%d" % rng.randint(0, 99999) for _ in range(3000))  # ~27 KB, no period
    giant_word = "x€" * 5000  # 20 KB without whitespace, multi-byte characters
    text = f"Short one. {long_sentence}\n{giant_word} tail.\tEnd\x00here"
    lines = bd.split_for_tokenizer(text)
    assert all(line and line == line.strip() and "\n" not in line for line in lines)
    assert max(len(line.encode()) for line in lines) <= bd.MAX_TOKENIZER_LINE_BYTES < 4096
    strip_ws = lambda s: re.sub(r"[\s\x00]+", "", s)  # noqa: E731
    assert strip_ws("".join(lines)) == strip_ws(text)
    # Cuts happen at whitespace: no word of the long sentence is broken.
    assert {w for line in lines for w in line.split()} >= set(long_sentence.split())


# ---------------------------------------------------------------------------
# full builds on a synthetic corpus
# ---------------------------------------------------------------------------

N_DOCS, N_VAL = 60, 5
SHARD_TOKENS = 2_000  # the synthetic corpus is ~8k train tokens -> 4 train shards, 1 val shard


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = synthetic_docs(N_DOCS)
    # Two input files to check that documents are taken in the order given.
    paths = [write_jsonl(d / "part1.jsonl.xz", docs[:40], xz=True), write_jsonl(d / "part2.jsonl", docs[40:])]
    return docs, paths


@pytest.fixture(scope="module")
def builds(corpus, tmp_path_factory):
    """The same build done twice into different output roots."""
    _, paths = corpus
    roots = [tmp_path_factory.mktemp(f"build{i}") for i in range(2)]
    manifests = [
        bd.build(paths, name="synth", val_docs=N_VAL, output_root=r, vocab_size=VOCAB,
                 shard_tokens=SHARD_TOKENS, log=lambda *a: None)
        for r in roots
    ]
    return roots, manifests


def test_build_layout_and_manifest(corpus, builds):
    _, paths = corpus
    (root, _), (manifest, _) = builds
    model = root / "tokenizers" / f"synth_{VOCAB}_bpe.model"
    ds = root / "datasets" / f"synth_sp{VOCAB}"
    assert model.is_file() and model.with_suffix(".vocab").is_file()
    assert sorted(p.name for p in ds.iterdir()) == sorted(
        ["manifest.json"] + manifest["files"]["train"] + manifest["files"]["val"]
    )
    assert json.loads((ds / "manifest.json").read_text()) == manifest
    stats = manifest["stats"]
    assert (stats["docs_total"], stats["docs_train"], stats["docs_val"]) == (N_DOCS, N_DOCS - N_VAL, N_VAL)
    assert stats["files_train"] >= 2, "several train shards expected"
    assert manifest["files"]["train"] == [f"fineweb_train_{i:06d}.bin" for i in range(stats["files_train"])]
    assert manifest["files"]["val"] == ["fineweb_val_000000.bin"]
    for split in ("train", "val"):
        tokens = read_split(ds, split)
        assert tokens.size == stats[f"tokens_{split}"]
        # One BOS per document; id 1 never occurs inside a document.
        assert int((tokens == 1).sum()) == stats[f"docs_{split}"]
        assert tokens.max() < manifest["tokenizer"]["vocab_size"] <= VOCAB
    # Every train shard but the last is exactly shard_tokens long.
    sizes = [bd.read_shard(ds / f).size for f in manifest["files"]["train"]]
    assert all(s == SHARD_TOKENS for s in sizes[:-1]) and 0 < sizes[-1] <= SHARD_TOKENS
    assert manifest["tokenizer"]["model_path"] == f"tokenizers/synth_{VOCAB}_bpe.model"
    assert manifest["tokenizer"]["model_sha256"] == bd.sha256_file(model)
    assert [s["sha256"] for s in manifest["sources"]] == [bd.sha256_file(p) for p in paths]


def test_val_is_last_documents_and_train_the_rest(corpus, builds):
    docs, _ = corpus
    (root, _), _ = builds
    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizers" / f"synth_{VOCAB}_bpe.model"))
    ds = root / "datasets" / f"synth_sp{VOCAB}"
    decoded = {
        split: [sp.decode(doc[1:].tolist()) for doc in split_on_bos(read_split(ds, split))]
        for split in ("train", "val")
    }
    assert decoded["val"] == docs[-N_VAL:]
    assert decoded["train"] == docs[:-N_VAL]


def test_tokenizer_has_challenge_settings(builds):
    (root, _), _ = builds
    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizers" / f"synth_{VOCAB}_bpe.model"))
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    # byte_fallback: all 256 byte pieces exist, and unseen characters become bytes.
    byte_a = sp.piece_to_id("<0x41>")
    assert byte_a != sp.unk_id() and sp.is_byte(byte_a)
    assert sum(sp.is_byte(i) for i in range(sp.vocab_size())) == 256
    snowman = sp.encode("\u2603", out_type=str)
    assert snowman == ["<0xE2>", "<0x98>", "<0x83>"] and sp.unk_id() not in sp.encode("\u2603")
    # split_digits: every digit is its own piece.
    assert [p for p in sp.encode("12345", out_type=str) if p != "\u2581"] == list("12345")
    # add_dummy_prefix=False: the first word gets no leading "\u2581".
    assert not sp.encode("kato", out_type=str)[0].startswith("\u2581")
    assert sp.vocab_size() <= VOCAB


def test_builds_are_deterministic(builds):
    roots, manifests = builds
    assert manifests[0]["stats"] == manifests[1]["stats"]
    for rel in [f"tokenizers/synth_{VOCAB}_bpe.model", f"tokenizers/synth_{VOCAB}_bpe.vocab"] + [
        f"datasets/synth_sp{VOCAB}/{f}" for f in manifests[0]["files"]["train"] + manifests[0]["files"]["val"]
    ]:
        assert (roots[0] / rel).read_bytes() == (roots[1] / rel).read_bytes(), rel


def test_cli_reuse_tokenizer_gives_identical_shards(corpus, builds, tmp_path):
    _, paths = corpus
    (root, _), (manifest, _) = builds
    model = root / "tokenizers" / f"synth_{VOCAB}_bpe.model"
    args = [str(p) for p in paths] + [
        "--name", "again", "--val-docs", str(N_VAL), "--output-root", str(tmp_path),
        "--shard-tokens", str(SHARD_TOKENS), "--reuse-tokenizer", str(model),
    ]
    assert bd.main(args) == 0
    vocab = manifest["tokenizer"]["vocab_size"]
    assert (tmp_path / "tokenizers" / f"again_{vocab}_bpe.model").read_bytes() == model.read_bytes()
    new_ds = tmp_path / "datasets" / f"again_sp{vocab}"
    for f in manifest["files"]["train"] + manifest["files"]["val"]:
        assert (new_ds / f).read_bytes() == (root / "datasets" / f"synth_sp{VOCAB}" / f).read_bytes()
    # An explicit, different vocab size contradicts the reused model.
    assert bd.main(args + ["--vocab-size", str(vocab + 1)]) == 1


def test_build_rejects_bad_settings(corpus, tmp_path):
    _, paths = corpus
    with pytest.raises(bd.BuildError, match="val_docs"):
        bd.build(paths, name="x", val_docs=N_DOCS, output_root=tmp_path, vocab_size=VOCAB)
    with pytest.raises(bd.BuildError, match="vocab_size"):
        bd.build(paths, name="x", val_docs=1, output_root=tmp_path, vocab_size=70_000)
    with pytest.raises(bd.BuildError, match="name"):
        bd.build(paths, name="../evil", val_docs=1, output_root=tmp_path)


# ---------------------------------------------------------------------------
# downloader against a local stand-in for the Hugging Face Hub
# ---------------------------------------------------------------------------

REPO_ID = "someone/parameter-golf"
FILES_TRAIN = 4


def make_hub_repo(hub: Path, repo_id: str, manifest: dict) -> Path:
    """Create a directory laid out like the hub dataset repo (prefix "datasets")."""
    base = hub / repo_id / "datasets"
    shards = base / "datasets" / "fineweb10B_sp1024"
    shards.mkdir(parents=True)
    (base / "manifest.json").write_text(json.dumps(manifest))
    bd.write_shard(shards / "fineweb_val_000000.bin", [1, 5, 6, 7])
    for i in range(FILES_TRAIN):
        bd.write_shard(shards / f"fineweb_train_{i:06d}.bin", [1] + [i + 10] * (i + 1))
    (base / "tokenizers").mkdir()
    (base / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"model bytes")
    (base / "tokenizers" / "fineweb_1024_bpe.vocab").write_text("<pad>\t0\n")
    (base / "docs_selected.jsonl").write_text('{"text": "a doc"}\n')
    (base / "docs_selected.source_manifest.json").write_text("{}")
    return base


def hub_manifest(files_val: int = 1) -> dict:
    return {
        "version": 1,
        "datasets": [
            {"name": "fineweb10B_byte260", "tokenizer_name": "pure_byte_260", "stats": {"files_train": 1, "files_val": 1}},
            {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
             "stats": {"files_train": FILES_TRAIN, "files_val": files_val, "tokens_train": 123}},
        ],
        "tokenizers": [
            {"name": "pure_byte_260", "path": "tokenizers/fineweb_pure_byte_260.json"},
            {"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
             "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"},
        ],
    }


class FakeHub:
    """Stand-in for hf_hub_download serving files from a local directory."""

    def __init__(self, hub: Path):
        self.hub = hub
        self.calls: list[tuple[str, str]] = []

    def __call__(self, *, repo_id: str, repo_type: str, filename: str) -> str:
        assert repo_type == "dataset"
        self.calls.append((repo_id, filename))
        path = self.hub / repo_id / filename
        if not path.is_file():
            raise FileNotFoundError(f"404: {repo_id}/{filename}")
        return str(path)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", REPO_ID)
    monkeypatch.delenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", raising=False)
    make_hub_repo(tmp_path / "hub", REPO_ID, hub_manifest())
    return FakeHub(tmp_path / "hub"), tmp_path / "data"


def test_downloader_fetches_val_first_n_train_and_tokenizer(hub):
    fake, local = hub
    assert ccf.main(["--train-shards", "2"], root=local, download_fn=fake) == 0
    remote = "datasets/datasets/fineweb10B_sp1024"
    assert fake.calls == [
        (REPO_ID, "datasets/manifest.json"),
        (REPO_ID, f"{remote}/fineweb_val_000000.bin"),
        (REPO_ID, f"{remote}/fineweb_train_000000.bin"),
        (REPO_ID, f"{remote}/fineweb_train_000001.bin"),
        (REPO_ID, "datasets/tokenizers/fineweb_1024_bpe.model"),
        (REPO_ID, "datasets/tokenizers/fineweb_1024_bpe.vocab"),
    ]
    shards = local / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in shards.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin",
    ]
    assert sorted(p.name for p in (local / "tokenizers").iterdir()) == [
        "fineweb_1024_bpe.model", "fineweb_1024_bpe.vocab",
    ]
    assert bd.read_shard(shards / "fineweb_train_000001.bin").tolist() == [1, 11, 11]
    # Hard-linked from the "cache", not copied.
    src = fake.hub / REPO_ID / remote / "fineweb_val_000000.bin"
    assert os.stat(shards / "fineweb_val_000000.bin").st_ino == os.stat(src).st_ino
    manifest = json.loads((local / "manifest.json").read_text())
    assert manifest["_downloaded_from"] == {"repo_id": REPO_ID, "remote_root_prefix": "datasets"}
    assert manifest["datasets"] == hub_manifest()["datasets"]
    assert not (local / "docs_selected.jsonl").exists()


def test_downloader_positional_shard_count(hub):
    fake, local = hub
    assert ccf.main(["3"], root=local, download_fn=fake) == 0
    names = sorted(p.name for p in (local / "datasets" / "fineweb10B_sp1024").glob("fineweb_train_*"))
    assert names == [f"fineweb_train_{i:06d}.bin" for i in range(3)]
    assert ccf.main(["3", "--train-shards", "2"], root=local, download_fn=fake) == 2


def test_downloader_too_many_train_shards_is_an_error(hub, capsys):
    fake, local = hub
    assert ccf.main(["--train-shards", str(FILES_TRAIN + 1)], root=local, download_fn=fake) == 1
    assert f"only {FILES_TRAIN} train shards" in capsys.readouterr().err
    assert [f for _, f in fake.calls] == ["datasets/manifest.json"]  # no shard was fetched
    assert not (local / "datasets").exists()


def test_downloader_skips_present_files_and_refetches_truncated(hub):
    fake, local = hub
    assert ccf.main(["2"], root=local, download_fn=fake) == 0
    fake.calls.clear()
    assert ccf.main(["2"], root=local, download_fn=fake) == 0
    assert fake.calls == []  # manifest reused, shards and tokenizer present
    # A truncated shard (size disagrees with its header) is fetched again.
    victim = local / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin"
    victim.unlink()  # drop the hard link first so the "cache" file stays intact
    victim.write_bytes(b"\x00" * 10)
    assert ccf.main(["2"], root=local, download_fn=fake) == 0
    assert [f for _, f in fake.calls] == ["datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"]
    assert bd.read_shard(victim).tolist() == [1, 11, 11]


def test_downloader_with_docs(hub):
    fake, local = hub
    assert ccf.main(["0", "--with-docs"], root=local, download_fn=fake) == 0
    assert (local / "docs_selected.jsonl").read_text() == '{"text": "a doc"}\n'
    assert (local / "docs_selected.source_manifest.json").is_file()
    assert [f for _, f in fake.calls][:3] == [
        "datasets/manifest.json", "datasets/docs_selected.jsonl", "datasets/docs_selected.source_manifest.json",
    ]
    assert not list((local / "datasets" / "fineweb10B_sp1024").glob("fineweb_train_*"))


def test_downloader_refetches_manifest_for_another_repo(hub, monkeypatch):
    fake, local = hub
    assert ccf.main(["1"], root=local, download_fn=fake) == 0
    make_hub_repo(fake.hub, "other/repo", hub_manifest(files_val=2))
    other_val = fake.hub / "other/repo/datasets/datasets/fineweb10B_sp1024/fineweb_val_000001.bin"
    bd.write_shard(other_val, [1, 9])
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "other/repo")
    fake.calls.clear()
    assert ccf.main(["1"], root=local, download_fn=fake) == 0
    assert fake.calls[0] == ("other/repo", "datasets/manifest.json")
    assert json.loads((local / "manifest.json").read_text())["_downloaded_from"]["repo_id"] == "other/repo"
    assert (local / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000001.bin").is_file()


def test_downloader_skip_manifest_needs_local_manifest(hub, capsys):
    fake, local = hub
    assert ccf.main(["1", "--skip-manifest"], root=local, download_fn=fake) == 1
    assert "no usable manifest" in capsys.readouterr().err
    assert fake.calls == []


def test_downloader_variants():
    assert ccf.dataset_name("sp1024") == "fineweb10B_sp1024"
    assert ccf.dataset_name("sp8192") == "fineweb10B_sp8192"
    assert ccf.dataset_name("byte260") == "fineweb10B_byte260"
    for bad in ("sp", "bpe1024", "byte256", "sp01024"):
        with pytest.raises(ccf.DownloadError):
            ccf.dataset_name(bad)


def test_manifest_parsing_is_tolerant():
    # Object keyed by name, counts on the entry itself, inline tokenizer, "path" key.
    manifest = {
        "datasets": {"fineweb10B_byte260": {"files_train": "3", "files_val": 1,
                                            "tokenizer": {"path": "tokenizers/byte260.json"}}},
    }
    assert ccf.resolve_dataset(manifest, "fineweb10B_byte260") == (3, 1, ["tokenizers/byte260.json"])
    assert ccf.resolve_dataset(hub_manifest(), "fineweb10B_sp1024") == (
        FILES_TRAIN, 1, ["tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab"],
    )
    with pytest.raises(ccf.DownloadError, match="available"):
        ccf.resolve_dataset(hub_manifest(), "fineweb10B_sp4096")


# ---------------------------------------------------------------------------
# SLOW: the real demo build (trains the vocab-1024 tokenizer on ~10 MB of text)
# ---------------------------------------------------------------------------


def test_prepare_demo_end_to_end_SLOW(tmp_path):
    cmd = [sys.executable, str(DATA / "prepare_demo.py"), "--output-root", str(tmp_path)]
    # Run from another directory: the script must not depend on the cwd.
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert "demo dataset built" in out
    model = tmp_path / "tokenizers" / "demo_1024_bpe.model"
    ds = tmp_path / "datasets" / "demo_sp1024"
    manifest = json.loads((ds / "manifest.json").read_text())
    stats = manifest["stats"]
    assert (stats["docs_total"], stats["docs_train"], stats["docs_val"]) == (233, 219, 14)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.vocab_size() == 1024 and sp.bos_id() == 1
    val = read_split(ds, "val")
    assert val.size == stats["tokens_val"] and int((val == 1).sum()) == 14
    assert read_split(ds, "train").size == stats["tokens_train"]
    # The validation split is the 2008-2021 addresses, in order.
    with lzma.open(DATA / "sotu_1790_2021.jsonl.xz", "rt", encoding="utf-8") as f:
        addresses = [json.loads(line) for line in f]
    assert [a["year"] for a in addresses[-14:]] == list(range(2008, 2022))
    val_docs = [sp.decode(doc[1:].tolist()) for doc in split_on_bos(val)]
    assert [d[:100] for d in val_docs] == [a["text"][:100] for a in addresses[-14:]]
    # Second run: outputs are current, nothing is rebuilt.
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert "up to date" in out
