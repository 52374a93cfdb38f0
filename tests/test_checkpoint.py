"""torch_dist checkpoints on a tiny Llama: saved by real multi-process jobs (gloo, CPU) at TP=2 / PP=2,
reloaded at TP=1 exactly; SIGKILL during a save; other-shape, corrupt and unsafe checkpoints refused."""
import dataclasses
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_utils import ROOT, WORKERS, free_port, torchrun

from megaslim import checkpoint
from megaslim.config import ModelConfig
from megaslim.errors import MegaslimError
from megaslim.model.arch import ModelArch


def _import(src, out, tp=1, pp=1):
    return torchrun("launch/import_ckpt.py", f"model.load={src}", f"output_dir={out}",
                    f"parallel.tensor_model_parallel_size={tp}",
                    f"parallel.pipeline_model_parallel_size={pp}", nproc=tp * pp, timeout=240)


@pytest.fixture(scope="module")
def saved(tiny_llama, tmp_path_factory):
    """import_ckpt of the tiny HF model at TP=2 and at PP=2 (two ranks each)."""
    base = tmp_path_factory.mktemp("ckpt")
    out = {"tp2": base / "tp2", "pp2": base / "pp2"}
    proc = _import(tiny_llama, out["tp2"], tp=2)
    assert "import_ckpt" in proc.stdout and "2 / 1" in proc.stdout  # the summary table
    _import(tiny_llama, out["pp2"], pp=2)
    return out


@pytest.fixture(scope="module")
def reference(tiny_llama, megatron_tp1):
    """The HF source loaded straight into megatron at TP=1: weights and logits to match exactly."""
    from megaslim.sources import load_model

    model, _, _ = load_model(ModelConfig(load=str(tiny_llama)))
    return _weights(model), _logits(model)


def _weights(model):
    from megaslim.model.state import named_params

    return {n: p.detach().clone() for n, p in named_params(model)}


def _logits(model):
    torch.manual_seed(3)
    tokens = torch.randint(0, 250, (2, 16))
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        return model(tokens, pos, None)


def _assert_same_as_reference(ckpt, reference, iteration=None):
    from megaslim.model.build import build_gpt

    meta = checkpoint.read_meta(ckpt, iteration)
    model = build_gpt(ModelArch.from_dict(meta["arch"]), ModelConfig())
    checkpoint.load_into(model, ckpt, iteration=iteration)
    weights, logits = reference
    got = _weights(model)
    assert got.keys() == weights.keys()
    for name, w in weights.items():
        assert torch.equal(got[name], w), name
    assert torch.equal(_logits(model), logits)
    return meta


@pytest.mark.dist  # multi-rank save (or torchrun)
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_saved_at_tp2_or_pp2_reloads_at_tp1_exactly(saved, reference, layout):
    root = saved[layout]
    assert checkpoint.is_checkpoint(root) and (root / "latest").read_text().strip() == "0"
    assert not list(root.glob("*.partial"))
    result = json.loads((root / "import_ckpt.json").read_text())
    assert result["params"] == 164_032 and result["checkpoint"].endswith("iter_0000000")
    meta = _assert_same_as_reference(root, reference)
    want = (2, 1) if layout == "tp2" else (1, 2)
    assert (meta["saved_with"]["tensor_model_parallel_size"],
            meta["saved_with"]["pipeline_model_parallel_size"]) == want


@pytest.mark.dist  # multi-rank save (or torchrun)
def test_load_model_accepts_a_checkpoint_root_or_iter_dir(saved, reference, megatron_tp1):
    from megaslim.sources import load_model

    for path in (saved["tp2"], saved["tp2"] / "iter_0000000"):
        model, arch, source = load_model(ModelConfig(load=str(path)))
        assert source.kind == "checkpoint" and arch.num_layers == 4
        assert torch.equal(_logits(model), reference[1])


@pytest.mark.dist  # multi-rank save (or torchrun)
def test_sigkill_during_save_keeps_previous_checkpoint(tiny_llama, reference, tmp_path):
    root, marker = tmp_path / "run", tmp_path / "marker"
    marker.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={free_port()}", "--monitor-interval=0.2", str(WORKERS / "ckpt_save.py"),
           str(tiny_llama), str(root), "2", "1", "1,2", "--perturb-from", "2", "--hang-at", "2", str(marker)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    try:
        deadline = time.time() + 180
        while len(list(marker.glob("*.pid"))) < 2:
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"worker never reached the save of iteration 2:\n{proc.communicate()[0][-4000:]}")
            time.sleep(0.2)
        partial = root / "iter_0000002.partial"
        assert len(list(partial.glob("*.distcp"))) == 4  # both ranks' pieces are written, not committed
        # torchrun starts each rank in its own session: kill each rank's group (rank + its helpers).
        for f in marker.glob("*.pid"):
            os.killpg(int(f.read_text()), signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert (root / "latest").read_text().strip() == "1"
    assert not (root / "iter_0000002").exists() and partial.is_dir()
    meta = _assert_same_as_reference(root, reference)  # iteration 1 = the unperturbed weights
    assert meta["iteration"] == 1 and meta["extra"] == {"step": 1} and meta["sharded_extra"] == ["optimizer"]

    # The next save (resumed at PP=2 from the TP=2 checkpoint) clears the stale partial.
    torchrun("ckpt_save.py", root, root, 1, 2, "3", nproc=2, timeout=240)
    assert (root / "latest").read_text().strip() == "3"
    assert not list(root.glob("*.partial")) and sorted(p.name for p in root.glob("iter_*")) == [
        "iter_0000001", "iter_0000003"]
    _assert_same_as_reference(root, reference)
    _assert_same_as_reference(root, reference, iteration=1)


@pytest.mark.dist  # multi-rank save (or torchrun)
def test_other_shape_is_refused_before_loading(saved, megatron_tp1):
    from megaslim.model.build import build_gpt

    arch = ModelArch.from_dict(checkpoint.read_meta(saved["tp2"])["arch"])
    small = build_gpt(dataclasses.replace(arch, ffn_hidden_size=64), ModelConfig())
    with pytest.raises(MegaslimError,
                       match=r"another model/shape: ffn_hidden_size: checkpoint 128 vs model 64"):
        checkpoint.load_into(small, saved["tp2"])
    with pytest.raises(MegaslimError, match=r"family: checkpoint 'llama' vs model 'qwen2'"):
        checkpoint.check_arch(checkpoint.read_meta(saved["tp2"]), dataclasses.replace(arch, family="qwen2"))
    # Without an arch to compare, megatron's own shape check still ends in a clear error.
    del small.arch
    with pytest.raises(MegaslimError, match=r"does not load into this model .*[Ss]hape"):
        checkpoint.load_into(small, saved["tp2"])


def _damage_cases():
    def drop(name):
        return lambda d: (d / name).unlink()

    def truncate(name):
        def f(d):
            data = (d / name).read_bytes()
            (d / name).write_bytes(data[: len(data) // 2])
        return f

    def evil_metadata(d):
        class Evil:
            def __reduce__(self):
                return (os.system, ("echo pwned",))
        (d / ".metadata").write_bytes(pickle.dumps(Evil()))

    return {
        "missing data file": (drop("__1_0.distcp"), r"data file __1_0.distcp is missing"),
        "truncated data file": (truncate("__0_1.distcp"),
                                r"data file __0_1.distcp has \d+ bytes, the index needs"),
        "truncated index": (truncate(".metadata"), r"\.metadata is missing or unreadable"),
        "unsafe index": (evil_metadata, r"refusing to unpickle (posix|os)\.system"),
        "missing common.pt": (drop("common.pt"), r"common\.pt is missing or unreadable"),
        "missing metadata.json": (drop("metadata.json"), r"metadata\.json is missing or unreadable"),
        "garbled megaslim.json": (lambda d: (d / "megaslim.json").write_text("{not json"),
                                  r"megaslim\.json is unreadable"),
    }


@pytest.mark.dist  # multi-rank save (or torchrun)
@pytest.mark.parametrize("case", list(_damage_cases()))
def test_corrupt_checkpoint_gives_clear_error(saved, tmp_path, megatron_tp1, case):
    from megaslim.sources import load_model

    damage, message = _damage_cases()[case]
    root = tmp_path / "ckpt"
    shutil.copytree(saved["tp2"], root)
    damage(root / "iter_0000000")
    with pytest.raises(MegaslimError, match=message):
        load_model(ModelConfig(load=str(root)))


@pytest.mark.dist  # multi-rank save (or torchrun)
def test_bad_latest_marker(saved, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(saved["tp2"], root)
    (root / "latest").write_text("7\n")
    with pytest.raises(MegaslimError, match=r"iteration 7 is named by 'latest' but iter_0000007/ is missing"):
        checkpoint.read_meta(root)
    (root / "latest").write_text("garbage")
    with pytest.raises(MegaslimError, match=r"latest is corrupt"):
        checkpoint.read_meta(root)


@pytest.mark.dist  # multi-rank save (or torchrun)
def test_interrupted_resave_and_leftover_partials(saved, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(saved["tp2"], root)
    # killed between the two renames of a re-save of iteration 0: the complete copy is `.old`
    (root / "iter_0000000").rename(root / "iter_0000000.old")
    assert checkpoint.read_meta(root)["path"].endswith("iter_0000000.old")
    checkpoint.verify(root)
    # a directory holding only an interrupted first save is not foreign content
    fresh = tmp_path / "fresh"
    (fresh / "iter_0000000.partial").mkdir(parents=True)
    checkpoint.check_output_dir(fresh)
    assert not checkpoint.is_checkpoint(fresh)


def test_import_refuses_foreign_output_dir(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch/import_ckpt.py"), f"model.load={tiny_llama}",
         f"output_dir={out}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is not a megaslim checkpoint" in proc.stderr and "notes.txt" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_smollm2_saved_at_tp3_reloads_at_tp1_with_identical_logits(smollm2_dir, tmp_path, megatron_tp1):
    from transformers import AutoTokenizer

    from megaslim.sources import load_model

    root = tmp_path / "smollm2"
    _import(smollm2_dir, root, tp=3)
    ref, _, _ = load_model(ModelConfig(load=str(smollm2_dir)))
    ref_logits = _logits(ref)
    del ref
    model, arch, source = load_model(ModelConfig(load=str(root)))
    assert checkpoint.read_meta(root)["saved_with"]["tensor_model_parallel_size"] == 3
    assert torch.equal(_logits(model), ref_logits)
    tok = AutoTokenizer.from_pretrained(str(source.tokenizer_dir))  # copied into the checkpoint
    assert Path(source.tokenizer_dir).parent == root / "iter_0000000"
    assert tok.eos_token_id == arch.eos_token_id


# ----------------------------------------------------------------------------------------------
# Disk full during a save: the partial folder goes, one line names the last complete checkpoint


def _assert_disk_full_handled(proc, root):
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert (f"error: no space left on {root}, the last complete checkpoint is iter_0000001 "
            f"({root / 'iter_0000001'})") in out, out[-3000:]
    assert "] Traceback" not in out  # no rank printed a traceback of ours (torchrun's own report aside)
    assert not list(root.glob("*.partial")) and sorted(p.name for p in root.iterdir()) == ["iter_0000001", "latest"]
    assert checkpoint.verify(root)["iteration"] == 1


@pytest.mark.dist  # multi-rank save (or torchrun)
def test_disk_full_in_one_ranks_writer(tiny_llama, tmp_path):
    """ENOSPC where megatron's writer (forked from rank 1) writes its data file: rank 0, where DCP
    gathers the failures, names the last complete checkpoint; the partial save is gone."""
    root = tmp_path / "run"
    proc = torchrun("ckpt_save.py", tiny_llama, root, 2, 1, "1,2", "--disk-full-at", "2", "1", nproc=2,
                    timeout=240, check=False)
    _assert_disk_full_handled(proc, root)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1.2 MB tmpfs (room for one checkpoint of the tiny model, not two); skipped where mount fails."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mnt)],
                                 capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        mounted = False
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected fault above covers the writer")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


@pytest.mark.dist  # multi-rank save (or torchrun)
def test_disk_full_on_a_small_tmpfs(tiny_llama, small_tmpfs):
    root = small_tmpfs / "run"
    proc = torchrun("ckpt_save.py", tiny_llama, root, 1, 1, "1,2", nproc=1, timeout=240, check=False)
    _assert_disk_full_handled(proc, root)
    assert shutil.disk_usage(small_tmpfs).free > 300_000  # the removed partial freed its space


@pytest.mark.parametrize("err, full", [
    (OSError(28, "No space left on device"), True),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), True),
    (RuntimeError("Worker failure: [Errno 28] No space left on device: '/x/__1_0.distcp'"), True),
    (RuntimeError("Worker failure: boom"), False),
    (PermissionError(13, "Permission denied"), False),
])
def test_out_of_space_is_recognised_through_dcps_wrapping(err, full):
    from torch.distributed.checkpoint.api import CheckpointException

    assert checkpoint.is_out_of_space(err) is full
    assert checkpoint.is_out_of_space(CheckpointException("write", {1: (err, None)})) is full
    try:
        try:
            raise err
        except BaseException as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert checkpoint.is_out_of_space(outer) is full
