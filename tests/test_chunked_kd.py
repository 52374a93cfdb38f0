"""Chunked logit losses (distill.logit_chunk_tokens): KD loss, LM loss and student gradients equal the
whole-logit path at TP=1 and TP=2 for every distill.kl kind and offline top-k; the training loop with
chunks matches the unchunked loop, and a killed-and-resumed chunked run stays bit-exact."""
import json

import pytest
import torch
from dist_utils import ROOT, torchrun
from workers.chunked_kd_tp import CASES, CHUNKS, check_all

from megaslim.config import ConfigError, load_config
from megaslim.distill.chunked import final_hidden_states

TEXT = ROOT / "tests" / "data" / "hamlet_excerpt.txt"
DISTILL = ROOT / "launch" / "distill.py"
ENV = {"OMP_NUM_THREADS": "1"}  # one thread: reductions in one order, runs agree bitwise


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A different tiny model (other seed, narrower, untied output layer) with the same vocabulary."""
    from tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("chunk") / "student", seed=5, hidden=48, ffn=96,
                           layers=2, tie=False)


def _models(teacher_dir, student_dir):
    from megaslim.config import ModelConfig
    from megaslim.sources import load_model

    teacher, arch, _ = load_model(ModelConfig(load=str(teacher_dir)))
    student, _, _ = load_model(ModelConfig(load=str(student_dir)))
    return teacher, student, arch


def test_chunked_equals_whole_logits_tp1(megatron_tp1, tiny_llama, student_dir):
    teacher, student, arch = _models(tiny_llama, student_dir)
    assert check_all(student, teacher, arch.vocab_size, "TP=1") == len(CASES) * len(CHUNKS)
    # the tied teacher and the untied student both go through their own output weights
    assert teacher.share_embeddings_and_output_weights and not student.share_embeddings_and_output_weights


def test_final_hidden_states_is_the_decoder_output(megatron_tp1, tiny_llama):
    teacher, _, _ = _models(tiny_llama, tiny_llama)
    tokens = torch.randint(0, 200, (2, 8))
    pos = torch.arange(8).expand(2, 8)
    with torch.no_grad():
        logits = teacher(tokens, pos, None)
        with final_hidden_states(teacher):
            hidden = teacher(tokens, pos, None)
        assert teacher.post_process  # restored
        from megaslim.distill.chunked import output_logits

        again = output_logits(teacher, hidden).transpose(0, 1)
    assert hidden.shape == (8, 2, teacher.config.hidden_size)
    torch.testing.assert_close(again, logits, rtol=0, atol=0)


def test_topk_kinds_with_lm_loss_and_no_padded_vocab(megatron_tp1, tmp_path):
    """A vocabulary of 256 (no padded columns): megatron's in-place cross-entropy must not clobber the
    logits the top-k gather saved (it did before: backward raised)."""
    from tiny import make_tiny_llama
    from workers.chunked_kd_tp import add_offline_topk, losses_and_grads, make_batch

    from megaslim.distill.chunked import OFFLINE, LogitLoss

    teacher, student, arch = _models(make_tiny_llama(tmp_path / "t", vocab=256, layers=2),
                                     make_tiny_llama(tmp_path / "s", vocab=256, layers=2, seed=2, tie=False))
    assert student.output_layer.weight.shape[0] == arch.vocab_size == 256  # untied: no padded rows
    student.train()
    batch = add_offline_topk(make_batch(256), teacher, 256)
    for kind in ("topk", OFFLINE):
        spec = LogitLoss(vocab_size=256, kind=kind, top_k=5, lm=True)
        ref = losses_and_grads(student, teacher, spec, batch, None)
        for chunk in (0, 7):  # whole from the hidden states (the default) and chunked
            got = losses_and_grads(student, teacher, spec, batch, chunk)
            torch.testing.assert_close(got[:2], ref[:2])
        assert ref[0] > 0 and ref[1] > 0


@pytest.mark.dist
def test_chunked_equals_whole_logits_tp2(tiny_llama, student_dir):
    """Real 2-process gloo job: each rank holds half the padded vocab; values and shard gradients."""
    proc = torchrun("chunked_kd_tp.py", tiny_llama, student_dir, nproc=2, timeout=600)
    n = len(CASES) * len(CHUNKS)
    for rank in (0, 1):
        assert f"chunked_kd_tp rank {rank} OK {n} cases at TP=2" in proc.stdout


def test_config_key():
    assert load_config(None, []).distill.logit_chunk_tokens == 0  # off by default
    assert load_config(None, ["distill.logit_chunk_tokens=2048"]).distill.logit_chunk_tokens == 2048
    with pytest.raises(ConfigError, match="distill.logit_chunk_tokens must be >= 0"):
        load_config(None, ["distill.logit_chunk_tokens=-1"])


# -- the training loop ---------------------------------------------------------------------------------
def _args(model_dir, out, plan, *extra):
    return [f"model.load={model_dir}", f"output_dir={out}", f"prune.plan_path={plan}",
            f"data.train_path={TEXT}", f"data.eval_path={TEXT}", "data.seq_length=32",
            "train.micro_batch_size=2", "train.global_batch_size=4", "train.lr=3e-3", "train.min_lr=3e-4",
            "train.warmup_iters=1", "train.train_iters=4", "checkpoint.save_interval=2", "eval.num_samples=4",
            "data.micro_batch_size=2", "distill.skip_lm_loss=false", *extra]


def _records(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("tokens_per_s", None)
    return [r for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def whole_run(tiny_llama_tok, tiny_pruned, tmp_path_factory):
    """The whole-logit reference run (TP=1, PP=1, 4 steps)."""
    out = tmp_path_factory.mktemp("whole") / "run"
    torchrun(DISTILL, *_args(tiny_llama_tok, out, tiny_pruned / "prune_plan.json"), nproc=1, timeout=300, env=ENV)
    return _records(out)


def _assert_close_records(got, ref, what):
    assert [r["step"] for r in got] == [r["step"] for r in ref[:len(got)]], what
    for a, b in zip(got, ref):
        for key in ("loss", "kd_loss", "lm_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (what, a["step"], key)


@pytest.mark.dist
def test_loop_chunked_matches_whole_and_resumes_bit_exact(tiny_llama_tok, tiny_pruned, whole_run, tmp_path):
    plan = tiny_pruned / "prune_plan.json"
    full, cut = tmp_path / "full", tmp_path / "cut"
    chunked = ["distill.logit_chunk_tokens=24"]  # 12 positions of the 2 x 32 micro-batch: 3 chunks
    torchrun(DISTILL, *_args(tiny_llama_tok, full, plan, *chunked), nproc=1, timeout=300, env=ENV)
    got = _records(full)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    _assert_close_records(got, whole_run, "TP=1")
    for a, b in zip(got, whole_run):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), a["step"]
    # stopped after step 2, resumed from its checkpoint: the same records bit for bit
    torchrun(DISTILL, *_args(tiny_llama_tok, cut, plan, *chunked, "train.exit_interval=2"), nproc=1,
             timeout=300, env=ENV)
    torchrun(DISTILL, *_args(tiny_llama_tok, cut, plan, *chunked, "resume=true"), nproc=1, timeout=300, env=ENV)
    resumed = _records(cut)
    resumed[1].pop("eval_loss")  # the exit_interval stop evaluated at step 2 (the full run did not)
    assert resumed == got


@pytest.mark.dist
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_loop_chunked_at_tp2_and_pp2_matches_whole_tp1(tiny_llama_tok, tiny_pruned, whole_run, tmp_path, tp, pp):
    """Through launch/distill.py: chunked at TP=2 (vocab-parallel chunks) and at PP=2 (the loss on the last
    stage only) gives the losses of the whole-logit run at TP=1 PP=1 (first two steps)."""
    out = tmp_path / "chunked"
    torchrun(DISTILL, *_args(tiny_llama_tok, out, tiny_pruned / "prune_plan.json", "train.exit_interval=2",
                             "distill.logit_chunk_tokens=24", f"parallel.tensor_model_parallel_size={tp}",
                             f"parallel.pipeline_model_parallel_size={pp}"), nproc=2, timeout=400, env=ENV)
    got = _records(out)
    assert len(got) == 2
    _assert_close_records(got, whole_run, f"TP={tp} PP={pp}")
