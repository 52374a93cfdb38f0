"""parallel.sequence_parallel: an MoE student distils at TP=2 (and TP2xPP2) with the TP=1 losses, router aux
loss and weights; a dense student's run is the same with and without it; what it cannot serve is refused in
one line before compute; at TP=1 it is off."""
import json

import pytest
from dist_utils import ROOT, torchrun
from moe_tiny import make_tiny_moe

from megaslim.model.hf import HFReader

TEXT = ROOT / "tests" / "data" / "hamlet_excerpt.txt"
DISTILL = ROOT / "launch" / "distill.py"
SP = "parallel.sequence_parallel=true"


def _args(teacher, student, out, *extra):
    return [f"model.load={teacher}", f"distill.student.load={student}", f"output_dir={out}",
            f"data.train_path={TEXT}", f"data.eval_path={TEXT}", "data.seq_length=16", "train.micro_batch_size=2",
            "train.global_batch_size=8", "train.lr=3e-3", "train.min_lr=3e-4", "train.warmup_iters=1",
            "eval.num_samples=4", "data.micro_batch_size=2", "train.train_iters=3", f"export.hf_dir={out}/hf", *extra]


def _by_step(out, key):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r[key] for r in rows if key in r}


def _same_run(a, b, keys, tol=1e-5):
    for key in keys:
        va, vb = _by_step(a, key), _by_step(b, key)
        assert sorted(va) == sorted(vb) and len(va) >= 2, (key, va, vb)  # eval_loss: steps 0 and 3
        for step in va:
            assert vb[step] == pytest.approx(va[step], abs=tol), (key, step)
    wa, wb = HFReader(a / "hf"), HFReader(b / "hf")
    assert wa.keys() == wb.keys()
    for k in wa.keys():
        assert (wa.get(k) - wb.get(k)).abs().max().item() < tol, k


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """MoE teacher (Mixtral) and MoE student (Qwen3-MoE: QK-norm), as tests/test_moe_distill.py's."""
    root = tmp_path_factory.mktemp("sp_moe")
    return {"teacher": make_tiny_moe(root / "teacher", "mixtral", seed=1, tokenizer=True),
            "student": make_tiny_moe(root / "student", "qwen3_moe", seed=2, tokenizer=True)}


# the router aux loss kept (its TP reduction is checked), and an intermediate pair (hidden states gathered)
MOE_EXTRA = ("distill.moe_aux_loss_coeff=0.05", "distill.intermediate_layer_pairs=[[1,1]]")


@pytest.fixture(scope="module")
def moe_tp1(moe, tmp_path_factory):
    out = tmp_path_factory.mktemp("sp_tp1")
    torchrun(DISTILL, *_args(moe["teacher"], moe["student"], out, *MOE_EXTRA), timeout=600)
    return out


@pytest.mark.dist
@pytest.mark.parametrize("pp, nproc", [(1, 2), (2, 4)], ids=["tp2", "tp2pp2"])
def test_moe_student_at_tp2_with_sp_equals_tp1(moe, moe_tp1, tmp_path, pp, nproc):
    """The norms' and routers' gradients are partial sums per sequence shard (megatron all-reduces the
    parameters marked `sequence_parallel`): without that the norm weights part by ~5e-3 after 3 steps."""
    out = tmp_path / "o"
    proc = torchrun(DISTILL, *_args(moe["teacher"], moe["student"], out, *MOE_EXTRA, SP,
                                    "parallel.tensor_model_parallel_size=2",
                                    f"parallel.pipeline_model_parallel_size={pp}"), nproc=nproc, timeout=600)
    _same_run(moe_tp1, out, ("loss", "kd_loss", "hidden_1_1", "moe_aux_loss", "grad_norm", "eval_loss"))
    assert json.loads((out / "distill.json").read_text())["sequence_parallel"] is True
    assert json.loads((moe_tp1 / "distill.json").read_text())["sequence_parallel"] is False
    assert "sequence parallel" in proc.stdout


@pytest.mark.dist
def test_dense_student_at_tp2_same_with_and_without_sp(tiny_llama_tok, tiny_pruned, tmp_path):
    """A width- and depth-pruned student (hidden 48, 2 layers) of a hidden-64 teacher: the contrastive
    intermediate loss (every position of the micro-batch against every other) through the learned
    projection, with the LM loss on."""
    runs = {}
    for name, extra in (("plain", ()), ("sp", (SP,))):
        out = runs[name] = tmp_path / name
        torchrun(DISTILL, *_args(tiny_llama_tok, tiny_pruned / "checkpoint", out, *extra,
                                 "parallel.tensor_model_parallel_size=2", "distill.intermediate_layer_pairs=[[1,3]]",
                                 "distill.intermediate_loss=contrastive", "distill.skip_lm_loss=false"),
                 nproc=2, timeout=600)
    _same_run(runs["plain"], runs["sp"], ("loss", "kd_loss", "lm_loss", "contrastive_1_3", "grad_norm"))


@pytest.mark.parametrize("extra, needle", [
    (("data.seq_length=15",), "splits data.seq_length=15 over parallel.tensor_model_parallel_size=2 ranks"),
    (("distill.logit_chunk_tokens=8",), "distill.logit_chunk_tokens=8 chunks the final hidden states"),
    (("distill.student.load=",), "parallel.sequence_parallel=true needs distill.student.load"),
], ids=["seq_length", "chunked", "default_student"])
def test_sp_bad_input(launch, moe, tmp_path, extra, needle):
    proc = launch("distill.py", *_args(moe["teacher"], moe["student"], tmp_path / "o", SP,
                                       "parallel.tensor_model_parallel_size=2", *extra), timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_sp_is_off_at_tp1():
    """As Megatron-LM: sequence parallelism needs TP>1; at TP=1 the flag is a no-op (megatron would refuse)."""
    from megaslim.config.load import load_config
    from megaslim.runtime import ParallelLayout

    cfg = load_config(None, [SP])
    assert ParallelLayout.from_config(cfg, world_size=1).sequence_parallel is False
    assert ParallelLayout.from_config(cfg, world_size=2).sequence_parallel is False  # TP=1, DP=2
    cfg = load_config(None, [SP, "parallel.tensor_model_parallel_size=2"])
    assert ParallelLayout.from_config(cfg, world_size=2).sequence_parallel is True
