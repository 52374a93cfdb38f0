"""FP8 through Transformer Engine.

CPU (always): every refusal message, settings from the config, the launcher's one-line refusal, and the
wiring of the FP8 region / weight-cache resets in DistillModel (with a recording context in place of
TE's autocast: it checks where megaslim enters and leaves the region, not FP8 numerics).
Recipe construction: only where TE imports. GPU-marked (CUDA + TE + compute capability >= 8.9, never
faked): TE autocast per recipe, and FP8 distillation tracking BF16 over 20 steps. One command on a TE
image (docs/fp8.md): `python -m pytest -m gpu tests/test_fp8.py`.
"""
import json
from types import SimpleNamespace

import pytest
import torch
from dist_utils import ROOT, torchrun

TEXT = ROOT / "tests" / "data" / "hamlet_excerpt.txt"


def _te_imports() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - ImportError or a CUDA/cuDNN load failure
        return False


HAVE_TE = _te_imports()
FP8_GPU = HAVE_TE and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
needs_te = pytest.mark.skipif(not HAVE_TE, reason="Transformer Engine does not import here")
needs_fp8_gpu = pytest.mark.skipif(not FP8_GPU, reason="needs CUDA + Transformer Engine + compute capability >= 8.9")


def _arch(**kw):
    from megaslim.model.arch import ModelArch

    base = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8, num_query_groups=4,
                kv_channels=8, vocab_size=320)
    return ModelArch(**{**base, **kw})


def _env(**kw):
    env = dict(te_error=None, te_version="2.8.0", te_recipes={"DelayedScaling", "Float8CurrentScaling",
                                                               "Float8BlockScaling", "MXFP8BlockScaling"},
               te_fp8_reason=None, cuda=True, capability=(9, 0))
    return {**env, **kw}


def _problems(settings=None, *, archs=None, tp=1, **env):
    from megaslim.distill.fp8 import Fp8Settings, fp8_problems

    return fp8_problems(settings or Fp8Settings("hybrid"), archs=archs or [("student", _arch())], tp=tp, **_env(**env))


def test_problems_name_every_failed_condition():
    from megaslim.distill.fp8 import Fp8Settings

    assert _problems() == []
    assert _problems(Fp8Settings("e4m3", "mxfp8"), capability=(10, 0)) == []
    text = " | ".join(_problems(te_error="ImportError: libcudnn.so.9", cuda=False, capability=None))
    assert "needs Transformer Engine, which does not import here (ImportError: libcudnn.so.9)" in text
    assert "needs a CUDA GPU with FP8 support" in text
    assert "compute capability 8.0" in " ".join(_problems(capability=(8, 0)))  # A100
    assert "needs >= 10.0" in " ".join(_problems(Fp8Settings("hybrid", "mxfp8"), capability=(9, 0)))
    ada = _problems(capability=(8, 9), te_fp8_reason="cuBLASLt too old")
    assert "FP8 unavailable: cuBLASLt too old" in " ".join(ada)
    assert "has no Float8CurrentScaling" in " ".join(
        _problems(Fp8Settings("hybrid", "tensorwise"), te_recipes={"DelayedScaling"}))
    widths = " ".join(_problems(archs=[("teacher", _arch(hidden_size=72, kv_channels=9))]))
    assert "the teacher at TP=1 has hidden_size=72" in widths
    assert "ffn_hidden_size / TP=40" in " ".join(_problems(archs=[("student", _arch(ffn_hidden_size=80))], tp=2))
    # the settings, the layer spec and the tokens per micro-batch: tests/test_config_checks.py


def test_settings_from_config():
    from megaslim.config import load_config
    from megaslim.distill.fp8 import Fp8Settings, settings_from_config

    assert settings_from_config(load_config(None, [])) is None
    hybrid = settings_from_config(load_config(None, ["distill.fp8=hybrid"]))
    assert hybrid == Fp8Settings("hybrid", "delayed", 1024, "max", 0)
    cfg = load_config(None, ["distill.fp8=e4m3", "distill.fp8_recipe=current", "distill.fp8_amax_history_len=16"])
    assert settings_from_config(cfg) == Fp8Settings("e4m3", "tensorwise", 16, "max", 0)


@pytest.mark.skipif(FP8_GPU, reason="FP8 can run here")
def test_check_fp8_refuses_on_this_machine():
    from megaslim.config import load_config
    from megaslim.distill.fp8 import check_fp8
    from megaslim.errors import MegaslimError

    cfg = load_config(None, ["distill.fp8=hybrid", "model.transformer_impl=transformer_engine"])
    with pytest.raises(MegaslimError, match="distill.fp8=hybrid cannot run") as err:
        check_fp8(cfg, archs=[("student", _arch())], tp=1)
    assert ("Transformer Engine" in str(err.value)) != HAVE_TE or "CUDA GPU" in str(err.value)
    assert check_fp8(load_config(None, []), archs=[], tp=1) is None


@pytest.mark.skipif(FP8_GPU, reason="FP8 can run here")
def test_launcher_refuses_fp8_in_one_line(launch, tiny_llama_tok, tmp_path):
    proc = launch("distill.py", f"model.load={tiny_llama_tok}", f"distill.student.load={tiny_llama_tok}",
                  f"output_dir={tmp_path / 'o'}", f"data.train_path={TEXT}", f"data.eval_path={TEXT}",
                  "data.seq_length=32", "distill.fp8=e4m3", "model.transformer_impl=transformer_engine", timeout=120)
    assert proc.returncode == 2 and "distill.fp8=e4m3 cannot run" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o" / "checkpoint").exists()


class _Stage(torch.nn.Module):
    """A stand-in model stage: one linear with megatron's TE `is_first_microbatch` flag."""

    def __init__(self, hidden, log, name):
        super().__init__()
        self.lin = torch.nn.Linear(hidden, hidden)
        self.lin.is_first_microbatch = False
        self.config = SimpleNamespace(hidden_size=hidden)
        self.post_process = True
        self.log, self.name = log, name

    def forward(self, tokens, position_ids, attention_mask=None):
        self.log.append((self.name, self.lin.is_first_microbatch, _Region.depth))
        self.lin.is_first_microbatch = False  # what megatron's TE linears do after a forward
        return self.lin(tokens)


class _Region:
    """Records where DistillModel opens the FP8 region (stand-in for TE's autocast)."""
    depth = 0

    def __init__(self, log):
        self.log = log

    def __call__(self):
        return self

    def __enter__(self):
        _Region.depth += 1
        self.log.append("enter")

    def __exit__(self, *exc):
        _Region.depth -= 1
        self.log.append("exit")


def test_distill_model_fp8_region_and_weight_caches():
    from megaslim.distill.model import DistillModel

    log = []
    student, teacher = _Stage(4, log, "student"), _Stage(4, log, "teacher")
    ddp = type("DDP", (torch.nn.Module,), {"forward": lambda self, *a: student(*a)})()
    ddp.config, ddp.module = student.config, student
    model = DistillModel(ddp, teacher, fp8=_Region(log))
    x = torch.randn(2, 4)
    for _step in range(2):
        model.set_is_first_microbatch()  # what megatron's schedules call at each step's first micro-batch
        for _ in range(2):
            s_out, t_out = model(x, None)
            assert s_out.requires_grad and not t_out.requires_grad
    calls = [e for e in log if isinstance(e, tuple)]
    # one region per micro-batch holding both forwards
    assert [e for e in log if isinstance(e, str)] == ["enter", "exit"] * 4
    assert all(depth == 1 for *_, depth in calls)
    # teacher: FP8 weights cast at its first forward only; student: at the first micro-batch of each step
    assert [first for name, first, _ in calls if name == "teacher"] == [True, False, False, False]
    assert [first for name, first, _ in calls if name == "student"] == [True, False, True, False]
    assert DistillModel(ddp, None).h_t == 0  # student alone (offline logits / LM-only)


@needs_te
def test_recipe_construction():
    import transformer_engine.common.recipe as te_recipe

    from megaslim.distill.fp8 import Fp8Settings, make_recipe
    from megaslim.errors import MegaslimError

    r = make_recipe(Fp8Settings("hybrid", "delayed", amax_history_len=16, amax_compute_algo="most_recent"))
    assert isinstance(r, te_recipe.DelayedScaling) and r.amax_history_len == 16
    assert r.fp8_format == te_recipe.Format.HYBRID
    assert make_recipe(Fp8Settings("e4m3")).fp8_format == te_recipe.Format.E4M3
    if hasattr(te_recipe, "Float8CurrentScaling"):
        assert isinstance(make_recipe(Fp8Settings("hybrid", "current")), te_recipe.Float8CurrentScaling)
    with pytest.raises(MegaslimError, match="unknown"):
        make_recipe(Fp8Settings("hybrid", "fp4"))


@pytest.mark.gpu
@needs_fp8_gpu
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_te_autocast_runs(recipe):
    import transformer_engine.pytorch as te

    from megaslim.distill.fp8 import Fp8Settings, autocast, make_recipe

    lin = te.Linear(64, 64, params_dtype=torch.bfloat16).cuda()
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with autocast(make_recipe(Fp8Settings("hybrid", recipe))):
        y = lin(x)
    y.float().pow(2).mean().backward()
    ref = x.detach().float() @ lin.weight.detach().float().t()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert (y.float() - ref).abs().mean() < 0.1 * ref.abs().mean()  # FP8 GEMM: ~few % error


@pytest.mark.dist
@pytest.mark.gpu
@needs_fp8_gpu
def test_fp8_kd_loss_tracks_bf16(tiny_llama_tok, tmp_path):
    """20 distillation steps (TE spec, BF16 params, forward KL) with distill.fp8=hybrid vs without:
    stated tolerance -- mean KD loss over the 20 steps within 5% of BF16, every step within 15%."""
    from tiny import make_tiny_llama

    student = make_tiny_llama(tmp_path / "student", tokenizer=True, seed=7, layers=2, ffn=64)
    losses = {}
    for name, extra in (("bf16", []), ("fp8", ["distill.fp8=hybrid"])):
        out = tmp_path / name
        torchrun(ROOT / "launch" / "distill.py", f"model.load={tiny_llama_tok}", f"distill.student.load={student}",
                 f"output_dir={out}", f"data.train_path={TEXT}", f"data.eval_path={TEXT}", "data.seq_length=64",
                 "train.micro_batch_size=4", "train.global_batch_size=8", "train.train_iters=20", "train.lr=1e-3",
                 "train.min_lr=1e-4", "train.warmup_iters=2", "eval.num_samples=4", "data.micro_batch_size=4",
                 "model.transformer_impl=transformer_engine", "model.params_dtype=bfloat16", *extra, nproc=1,
                 timeout=600)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["kd_loss"] for r in rows if "kd_loss" in r]
    bf16, fp8 = torch.tensor(losses["bf16"]), torch.tensor(losses["fp8"])
    assert len(bf16) == len(fp8) == 20 and torch.isfinite(fp8).all()
    assert abs(fp8.mean() - bf16.mean()) <= 0.05 * bf16.mean(), (losses, "mean")
    assert ((fp8 - bf16).abs() <= 0.15 * bf16.abs()).all(), losses
