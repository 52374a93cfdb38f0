"""Runtime: a failing rank ends the job; bad input is refused with one clear line before compute."""
import pytest
from dist_utils import torchrun


@pytest.mark.dist
def test_failing_rank_ends_job_quickly():
    # A hang would last the gloo timeout (30 min); the subprocess timeout catches it without timing the machine.
    proc = torchrun("fail_one_rank.py", nproc=2, check=False, timeout=300)
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stderr
    assert "unreachable" not in proc.stdout


@pytest.mark.parametrize("overrides, needle", [
    (["model.load=/no/such/model"], "no such file or directory"),
    (["parallel.tensor_model_parallel_size=3"], "not divisible by TP=3"),
    (["parallel.tensor_model_parallel_size=8"], "num_query_groups=4 < TP=8"),
    (["parallel.pipeline_model_parallel_size=3"], "num_layers=4 is not divisible by PP=3"),
    (["parallel.tensor_model_parallel_sz=2"], "unknown config key 'parallel.tensor_model_parallel_sz'"),
])
def test_bad_input_is_one_clear_line(launch, tiny_llama, tmp_path, overrides, needle):
    out = tmp_path / "out"
    args = [f"model.load={tiny_llama}", f"data.eval_path={tmp_path}/x.txt", f"output_dir={out}", *overrides]
    proc = launch("evaluate.py", *args)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # nothing written


def test_unsupported_architecture(launch, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
    proc = launch("export_hf.py", f"model.load={tmp_path}", f"export.hf_dir={tmp_path}/out")
    assert proc.returncode == 2
    assert "unsupported architecture model_type='gpt2'" in proc.stderr and "llama" in proc.stderr


def test_export_refuses_foreign_directory(launch, tiny_llama, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    proc = launch("export_hf.py", f"model.load={tiny_llama}", f"export.hf_dir={foreign}")
    assert proc.returncode == 2 and "not a megaslim export" in proc.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"
