"""Distilling a mixture-of-experts student (from an MoE or a dense teacher): the router's load-balancing loss
is applied with its coefficient (or off) and logged; the gradient is the KD gradient plus coeff x the aux
gradient at megatron's scale (1 / micro-batches); EP=2 and PP=2 match one process; SIGKILL + resume is
bit-exact; what cannot work is refused before any weight is read (TP>1: tests/test_sequence_parallel.py)."""
import json

import pytest
import torch
import torch.nn.functional as F
from dist_utils import ROOT, kill_after_step, torchrun
from moe_tiny import make_tiny_moe

from megaslim.model.hf import HFReader

TEXT = ROOT / "tests" / "data" / "hamlet_excerpt.txt"
COEFF = 0.05  # large enough that the aux term moves the losses at 1e-5


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """An MoE teacher (Mixtral: tied embeddings, renormalised top-2) and an MoE student (Qwen3-MoE: QK-norm),
    2 layers of 4 experts each, hidden 32, with the tiny tokenizer (vocab 320, as tiny_llama_tok's)."""
    root = tmp_path_factory.mktemp("moe_distill")
    return {"teacher": make_tiny_moe(root / "teacher", "mixtral", seed=1, tokenizer=True),
            "student": make_tiny_moe(root / "student", "qwen3_moe", seed=2, tokenizer=True)}


def _args(teacher, student, out, *extra):
    return [f"model.load={teacher}", f"distill.student.load={student}", f"output_dir={out}",
            f"data.train_path={TEXT}", f"data.eval_path={TEXT}", "data.seq_length=16",
            "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=3e-3", "train.min_lr=3e-4",
            "train.warmup_iters=1", "eval.num_samples=4", "data.micro_batch_size=2", "train.train_iters=4",
            "checkpoint.save_interval=2", *extra]


def _records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _by_step(out, key):
    found = {}
    for r in _records(out):
        if key in r:
            assert r["step"] not in found, f"step {r['step']} twice in {out / 'metrics.jsonl'}"
            found[r["step"]] = r[key]
    return found


def _run(moe, out, *extra, nproc=1):
    return torchrun(ROOT / "launch" / "distill.py", *_args(moe["teacher"], moe["student"], out,
                    f"distill.moe_aux_loss_coeff={COEFF}", f"export.hf_dir={out}/hf", *extra), nproc=nproc, timeout=600)


@pytest.fixture(scope="module")
def ref(moe, tmp_path_factory):
    """The one-process run: MoE teacher -> MoE student, aux loss kept at COEFF."""
    out = tmp_path_factory.mktemp("ref")
    proc = _run(moe, out)
    return out, proc.stdout


def test_moe_student_from_moe_teacher_logs_the_aux_loss(ref):
    out, stdout = ref
    loss, aux = _by_step(out, "kd_loss"), _by_step(out, "moe_aux_loss")
    assert sorted(loss) == sorted(aux) == [1, 2, 3, 4]
    assert loss[4] < loss[1]
    assert all(v > 0.5 for v in aux.values()), aux  # E * sum f_i P_i: 1 when balanced, >= ~1 in general
    record = json.loads((out / "distill.json").read_text())
    assert record["router_aux_loss"]["coeff"] == COEFF and record["router_aux_loss"]["kept"]
    assert record["router_aux_loss"]["moe_aux_loss"] == aux[4]
    assert record["student_eval_loss"] < record["student_eval_loss_start"]
    assert "router aux loss" in stdout and f"coeff {COEFF:g} (kept)" in stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("distill/moe_aux_loss")] == pytest.approx([aux[s] for s in (1, 2, 3, 4)])


def test_moe_student_from_dense_teacher_aux_off(moe, tiny_llama_tok, tmp_path):
    """A dense teacher (hidden 64) with the aux loss off, chunked logits and an intermediate pair through the
    learned projection (hidden 32 -> 64): no aux values; the summary says off."""
    out = tmp_path / "o"
    proc = torchrun(ROOT / "launch" / "distill.py", *_args(
        tiny_llama_tok, moe["student"], out, "distill.moe_aux_loss_coeff=0", "distill.logit_chunk_tokens=8",
        "distill.intermediate_layer_pairs=[[1,3]]"), timeout=600)
    assert not _by_step(out, "moe_aux_loss")
    loss = _by_step(out, "loss")
    assert sorted(loss) == [1, 2, 3, 4] and loss[4] < loss[1]
    record = json.loads((out / "distill.json").read_text())
    assert record["router_aux_loss"] == {"coeff": 0.0, "kept": False}
    assert "coeff 0 (off)" in proc.stdout


@pytest.mark.dist
@pytest.mark.parametrize("layout", ["parallel.expert_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"],
                         ids=["ep2", "pp2"])
def test_ep2_and_pp2_equal_one_process(moe, ref, tmp_path, layout):
    base, _ = ref
    out = tmp_path / "o"
    _run(moe, out, layout, nproc=2)
    for key in ("loss", "moe_aux_loss", "grad_norm"):
        a, b = _by_step(base, key), _by_step(out, key)
        assert sorted(a) == sorted(b) == [1, 2, 3, 4], key
        for step in a:
            assert b[step] == pytest.approx(a[step], abs=1e-5), (key, step)
    wa, wb = HFReader(base / "hf"), HFReader(out / "hf")
    assert wa.keys() == wb.keys()
    for k in wa.keys():
        assert (wa.get(k) - wb.get(k)).abs().max().item() < 1e-5, k


@pytest.mark.dist
def test_sigkill_then_resume_at_ep2_is_bit_exact(moe, tmp_path):
    """Experts split over 2 EP ranks (their own optimizer under DP=2): a run killed after step 3 resumes from
    its step-2 checkpoint and ends bit-identical to an uninterrupted one, aux values included."""
    ep = "parallel.expert_model_parallel_size=2"
    full, killed = tmp_path / "full", tmp_path / "killed"
    _run(moe, full, ep, nproc=2)
    kill_after_step(ROOT / "launch" / "distill.py", _args(moe["teacher"], moe["student"], killed, ep,
                    f"distill.moe_aux_loss_coeff={COEFF}", f"export.hf_dir={killed}/hf"), killed, 3, nproc=2)
    assert not (killed / "hf").exists()
    assert (killed / "checkpoint" / "latest").read_text().strip() in ("2", "4")
    _run(moe, killed, ep, "resume=true", nproc=2)
    for key in ("loss", "moe_aux_loss", "grad_norm"):
        a, b = _by_step(full, key), _by_step(killed, key)
        assert sorted(b) == [1, 2, 3, 4] and a == b, key  # bitwise on CPU
    wa, wb = HFReader(full / "hf"), HFReader(killed / "hf")
    for k in wa.keys():
        assert torch.equal(wa.get(k), wb.get(k)), k


def test_resume_with_another_coeff_is_refused(launch, moe, ref, tmp_path):
    import shutil

    out = tmp_path / "o"
    shutil.copytree(ref[0] / "checkpoint", out / "checkpoint")
    proc = launch("distill.py", *_args(moe["teacher"], moe["student"], out, "resume=true", "train.train_iters=6",
                                       "distill.moe_aux_loss_coeff=0.01"), timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"router aux-loss coefficient {COEFF:g}" in errors[0], errors


def _manual_aux(router, hidden):
    """megatron's switch load-balancing loss of one router on one micro-batch, without the coefficient,
    written out: E / (k T^2) * sum_i (sum_x p_xi) * count_i, p = softmax over all experts."""
    logits = router.gating(hidden).view(-1, router.config.num_moe_experts)
    scores = torch.softmax(logits.float(), dim=-1)
    k, (t, e) = router.topk, scores.shape
    counts = torch.zeros_like(scores).scatter(1, scores.topk(k, dim=1).indices, 1.0).sum(0).detach()
    return e / (k * t * t) * (scores.sum(0) * counts).sum()


def test_student_gradient_is_kd_plus_coeff_times_aux(moe, megatron_tp1):
    """Through megatron's schedule (3 micro-batches, DDP buffers): coeff=0 gives the KD-only gradient;
    coeff=c adds exactly the gradient of c x (the aux loss written out, averaged over micro-batches, summed
    over layers); the tracker holds the student's layers only (the MoE teacher adds nothing)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
    from megatron.core.transformer.moe.router import TopKRouter

    from megaslim.config import ModelConfig
    from megaslim.distill.model import DistillModel, RouterAuxLoss
    from megaslim.sources import load_model

    student, _, _ = load_model(ModelConfig(load=str(moe["student"])))
    teacher, _, _ = load_model(ModelConfig(load=str(moe["teacher"])))
    student.train()
    ddp = DistributedDataParallel(student.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False), student)
    model = DistillModel(ddp, teacher)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 320, (2, 16), generator=gen) for _ in range(3)]
    routers = [m for m in student.modules() if isinstance(m, TopKRouter)]
    assert len(routers) == 2

    def run(coeff, kd_weight, manual=0.0):
        aux = RouterAuxLoss(student, coeff)
        aux.clear()
        ddp.zero_grad_buffer()
        seen, per_layer = [], torch.zeros(2, dtype=torch.float64)
        hooks = [r.register_forward_pre_hook(lambda m, a: seen.append((m, a[0]))) for r in routers]

        def loss_func(output):
            s, t = output
            kd = F.kl_div(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), log_target=True,
                          reduction="batchmean")
            terms = [_manual_aux(m, x) for m, x in seen]
            per_layer.add_(torch.tensor([v.item() for v in terms], dtype=torch.float64))
            return kd_weight * kd + manual * sum(terms), {}

        def step(it, m):
            seen.clear()
            tokens = next(it)
            return m(tokens, torch.arange(16).expand(2, 16), None), loss_func

        try:
            get_forward_backward_func()(forward_step_func=step, data_iterator=iter(batches), model=[model],
                                        num_microbatches=3, seq_length=16, micro_batch_size=2, forward_only=False)
        finally:
            for h in hooks:
                h.remove()
        grads = {n: p.main_grad.clone() for n, p in student.named_parameters()}
        tracker = {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}
        return grads, tracker, aux.metrics(3), per_layer

    kd_only, t0, m0, _ = run(0.0, 1.0)
    both, t1, m1, per_layer = run(COEFF, 1.0)
    aux_only, _, _, _ = run(COEFF, 0.0)
    manual, _, _, _ = run(0.0, 0.0, manual=COEFF)
    assert m0 == {} and not any(v.abs().sum() for v in t0.values())
    router_grad = [n for n in both if n.endswith("router.weight")]
    assert router_grad and all(aux_only[n].abs().max() > 1e-6 for n in router_grad)
    for n in both:
        scale = both[n].abs().max().item() + 1e-12
        assert (both[n] - kd_only[n] - aux_only[n]).abs().max().item() <= 1e-5 * scale, n
        assert (aux_only[n] - manual[n]).abs().max().item() <= 1e-5 * (aux_only[n].abs().max().item() + 1e-9), n
    # tracker: the per-layer sums over micro-batches (student layers only), metrics: their mean
    assert t1["load_balancing_loss"].double() == pytest.approx(per_layer, rel=1e-5)
    assert m1["moe_aux_loss"] == pytest.approx(per_layer.sum().item() / (2 * 3), rel=1e-5)


def test_compress_prunes_experts_then_distills_with_the_aux_loss(moe, tmp_path):
    """launch/compress.py on an MoE model: 4 -> 2 experts, then distillation keeping the student's own
    coefficient (Mixtral's config: 0.001); with top-2 of 2 experts every token goes to both, so the
    load-balancing loss is exactly 1."""
    out = tmp_path / "c"
    torchrun(ROOT / "launch" / "compress.py", f"model.load={moe['teacher']}", f"output_dir={out}",
             f"data.train_path={TEXT}", f"data.eval_path={TEXT}", f"data.calib_path={TEXT}", "data.seq_length=16",
             "importance.num_samples=8", "train.micro_batch_size=2", "train.global_batch_size=4",
             "train.train_iters=2", "train.warmup_iters=1", "train.lr=3e-3", "eval.num_samples=4",
             "compress.rounds=[{num_moe_experts: 2}]", timeout=600)
    result = json.loads((out / "compress.json").read_text())
    assert result["rounds"][0]["params"] < result["source_params"]
    record = json.loads((out / "round1" / "distill" / "distill.json").read_text())
    assert record["router_aux_loss"] == {"coeff": 0.001, "kept": True, "moe_aux_loss": pytest.approx(1.0, abs=1e-6)}
    assert json.loads((out / "round1" / "hf" / "config.json").read_text())["num_local_experts"] == 2


def test_moe_student_at_tp2_without_sp_is_refused_before_any_weight(moe, tmp_path):
    """megatron-core trains MoE layers at TP>1 only with sequence parallelism: the refusal names the key
    (tests/test_sequence_parallel.py runs it)."""
    import os
    import subprocess
    import sys

    args = _args(moe["teacher"], moe["student"], tmp_path / "o", "parallel.tensor_model_parallel_size=2")
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "distill.py"), "--check", *args], cwd=ROOT,
                          env=dict(os.environ, WORLD_SIZE="2"), capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "the student is a mixture of experts" in errors[0] and "parallel.sequence_parallel=true" in errors[0], errors
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("student, extra, needle", [
    ("dense", "distill.moe_aux_loss_coeff=0.01", "is set but the student is not a mixture of experts"),
    ("moe", "distill.moe_aux_loss_coeff=-1", "must be >= 0"),
])
def test_aux_coeff_bad_input(launch, moe, tiny_llama_tok, tmp_path, student, extra, needle):
    s = tiny_llama_tok if student == "dense" else moe["student"]
    proc = launch("distill.py", *_args(moe["teacher"], s, tmp_path / "o", extra), timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "o" / "checkpoint").exists()
