"""The dry-run planner (megaslim/commands/plan.py, `launch/compress.py --dry-run`) and the paper recipes in
configs/recipes/: every recipe validates and plans, exact parameter counts, refusals with reasons."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megaslim.commands import plan as planner
from megaslim.commands import planning
from megaslim.commands.plan import PlanError, PlannerOptions
from megaslim.config import load_config
from megaslim.errors import MegaslimError
from megaslim.model.hf import arch_from_hf_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
HF = ROOT / "configs" / "recipes" / "hf_configs"
WIDTH = ROOT / "configs" / "recipes" / "llama3.1-8b_to_4b_width.yaml"
DEPTH = ROOT / "configs" / "recipes" / "llama3.1-8b_to_4b_depth.yaml"
NEMOTRON = ROOT / "configs" / "recipes" / "nemotron4-15b_to_8b_to_4b.yaml"


def _plan(path: Path, *overrides: str, **opts) -> planner.Plan:
    return planner.plan(load_config(path, list(overrides)), PlannerOptions(**opts), config_path=path)


def _quiet():
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), width=160)


def test_recipe_set():
    names = {p.stem for p in RECIPES}
    assert names == {"llama3.1-8b_to_4b_width", "llama3.1-8b_to_4b_depth", "qwen3-8b_to_6b",
                     "mistral-nemo-12b_to_8b", "nemotron4-15b_to_8b_to_4b"}
    for name in ("Llama-3.1-8B", "Qwen3-8B", "Mistral-NeMo-12B", "Nemotron-4-15B"):
        assert (HF / f"{name}.json").is_file()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_and_dry_runs(path):
    cfg = load_config(path)  # unknown keys / wrong types would raise
    assert cfg.model.load and cfg.model.load.startswith("/path/to/")  # a placeholder for the user's copy
    assert cfg.model.params_dtype == "bfloat16" and cfg.model.transformer_impl == "modelopt"
    for nodes in (1, 8):  # 8x80 GB nodes: one, and a multi-node job
        p = planner.dry_run(cfg, PlannerOptions(nodes=nodes), config_path=path, console=_quiet())
        assert p.fits and p.dp == nodes * 8 // (p.tp * p.pp)
        rounds = len(cfg.compress.rounds) or 1
        assert [s.kind for s in p.stages] == ["teacher"] + ["prune", "distill"] * rounds
        for s in p.stages[1:]:
            assert 0 < s.memory_gib <= 80 and s.hours > 0 and s.flops > 0
        d = p.stages[2]
        tokens = cfg.train.train_iters * cfg.train.global_batch_size * cfg.data.seq_length
        assert d.numbers["tokens"] == tokens
        # time = tokens * (3 F_student + F_teacher) / (GPUs * peak * MFU), plus a few eval passes
        ideal = tokens * d.flops / (nodes * 8 * 989e12 * 0.4) / 3600
        assert ideal <= d.hours < 1.01 * ideal


def test_recipe_settings_follow_the_papers():
    w, dpt = load_config(WIDTH), load_config(DEPTH)
    for c in (w, dpt):  # arXiv 2408.11796: 1e-4 -> 1e-5, 40 warmup, cosine, GBS 1152 x 8192, 94B tokens
        assert (c.train.lr, c.train.min_lr, c.train.warmup_iters, c.train.global_batch_size, c.data.seq_length) == \
            (1e-4, 1e-5, 40, 1152, 8192)
        assert round(c.train.train_iters * 1152 * 8192 / 1e9) == 94
    assert not w.distill.intermediate_layer_pairs  # width: logit-only
    assert dpt.distill.intermediate_layer_pairs and dpt.prune.drop_contiguous  # depth: logit + intermediate
    m = load_config(ROOT / "configs" / "recipes" / "mistral-nemo-12b_to_8b.yaml")
    assert (m.train.lr, m.train.min_lr, m.train.warmup_iters, m.train.global_batch_size) == (1e-4, 4.5e-7, 60, 768)
    assert round(m.train.train_iters * 768 * m.data.seq_length / 1e9) == 380
    n = load_config(NEMOTRON)
    assert len(n.compress.rounds) == 2 and n.compress.teacher == "original"


def test_exact_parameter_counts():
    w, d = _plan(WIDTH), _plan(DEPTH)
    assert w.stage("teacher").params == d.stage("teacher").params == 8_030_261_248
    assert w.stage("round 1 distill").params == 4_512_746_496
    assert d.stage("round 1 distill").params == 4_540_469_248
    # the planner's counts are ModelArch.num_params of megaslim's own HF reading
    assert arch_from_hf_config(json.loads((HF / "Llama-3.1-8B.json").read_text())).num_params() == 8_030_261_248
    assert _plan(NEMOTRON).stage("round 1 distill").params == 8_271_699_968  # Minitron-8B (paper: 8.3B)
    assert _plan(NEMOTRON).stage("round 2 distill").params == 4_190_509_056  # Minitron-4B (paper: 4.2B)


def test_activation_formula_by_hand():
    # Llama width student at TP 2, s 8192, b 1: s*b*(4h + (2q + 2kv + 3f)/TP) elements per layer
    student = arch_from_hf_config(json.loads((HF / "Llama-3.1-8B.json").read_text()))
    from dataclasses import replace

    student = replace(student, hidden_size=3072, ffn_hidden_size=9216)
    n = planning.layer_activation_elems(student, s=8192, b=1, tp=2, flash=True)
    assert n == 8192 * (4 * 3072 + (2 * 4096 + 2 * 1024 + 3 * 9216) // 2)
    # without flash attention the a*s^2*b/TP softmax scores are stored too
    assert planning.layer_activation_elems(student, s=8192, b=1, tp=2, flash=False) == n + 32 * 8192 ** 2 // 2
    # memory per GPU: bf16 weights, fp32 grads, 12 B/param of Adam state over DP
    p = _plan(WIDTH)
    parts = p.stage("round 1 distill").numbers
    assert parts["student grads"] == 2 * parts["student weights"]
    assert parts["optimizer state"] == pytest.approx(12 * parts["params_rank"] / p.dp)


def test_refuses_what_does_not_fit_memory():
    with pytest.raises(PlanError, match=r"distillation needs [\d.]+ GiB per GPU .* over the 80.00 GiB"):
        planner.dry_run(load_config(WIDTH, ["parallel.tensor_model_parallel_size=1"]), PlannerOptions(),
                        config_path=WIDTH, console=_quiet())
    p = _plan(WIDTH, gpu_memory_gib=40)  # the same recipe on 40 GB cards
    assert not p.fits and "raise TP or PP" in p.problems[0]


@pytest.mark.parametrize("overrides, opts, message", [
    (["parallel.tensor_model_parallel_size=3"], {"gpus_per_node": 6}, "num_query_groups=8 is not divisible by TP=3"),
    (["parallel.tensor_model_parallel_size=4"], {"gpus_per_node": 6}, "6 GPUs do not split into TP 4 x PP 1"),
    ([], {"nodes": 5}, "global_batch_size=1152 is not a multiple of train.micro_batch_size x DP = 1 x 20"),
    (["parallel.pipeline_model_parallel_size=8", "parallel.tensor_model_parallel_size=1"], {},
     "not on the last pipeline stage"),
    (["prune.export_config.num_layers=48"], {}, "larger than the source's 32"),
], ids=["tp-heads", "world", "batch", "pairs-pp", "target"])
def test_refuses_layouts_that_do_not_divide(overrides, opts, message):
    with pytest.raises(PlanError, match=message):
        _plan(DEPTH, *overrides, **opts)


def test_nemotron_plans_as_the_loader_reads_it():
    """The Nemotron recipe plans from megaslim's own HF reader: ungated squared-ReLU MLP, LayerNorm1P."""
    arch = arch_from_hf_config(json.loads((HF / "Nemotron-4-15B.json").read_text()))
    assert not arch.gated and arch.normalization == "LayerNorm1P"
    p = _plan(NEMOTRON)
    assert p.fits and planner.to_json(p)["dry_run_only"] is None
    assert p.stage("teacher").params == 15_628_775_424  # Nemotron-4 15B (paper: 15.6B)


def test_shape_sources(tmp_path):
    # model.load that exists: its config.json wins over the name convention
    model = tmp_path / "Llama-3.1-8B"
    model.mkdir()
    hf = json.loads((HF / "Llama-3.1-8B.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(hf, num_hidden_layers=16)))
    p = _plan(WIDTH, f"model.load={model}")
    assert "config.json" in p.source and p.stage("teacher").params < 8_030_261_248
    # --hf-config (a file or its directory) wins over model.load
    assert _plan(WIDTH, f"model.load={model}", hf_config=str(HF / "Llama-3.1-8B.json")).stage(
        "teacher").params == 8_030_261_248
    assert "--hf-config" in _plan(WIDTH, hf_config=str(model)).source
    # a megaslim checkpoint: its metadata (here a pruned student, as round 2 of a compress run would see it)
    from dataclasses import replace

    from megaslim.checkpoint import FORMAT, META

    arch = replace(arch_from_hf_config(hf), hidden_size=3072, ffn_hidden_size=9216)
    ckpt = tmp_path / "ckpt" / "iter_0000010"
    ckpt.mkdir(parents=True)
    (ckpt / META).write_text(json.dumps({"format": FORMAT, "version": 1, "arch": arch.to_dict()}))
    p = _plan(WIDTH, f"model.load={ckpt}", "prune.export_config.hidden_size=2048")
    assert "checkpoint metadata" in p.source and p.stage("teacher").params == 4_512_746_496
    # an unknown name: a clear error naming the way out
    with pytest.raises(PlanError, match="pass --hf-config"):
        _plan(WIDTH, "model.load=/nowhere/MyModel-7B")
    # the embedded default (model.load unset) plans from its shipped config
    smol = ROOT / "configs" / "smollm2.yaml"
    assert _plan(smol).stage("teacher").params == 134_515_008


def test_shapes_need_no_checkout(tmp_path, monkeypatch):
    """No lookup goes through the package's location: the embedded default's config ships as package data,
    a recipe finds hf_configs/ beside itself, and other names are looked up under the working directory."""
    monkeypatch.chdir(tmp_path)
    p = planner.plan(load_config(None), PlannerOptions(gpus_per_node=1))
    assert "model.load unset" in p.source and p.stage("teacher").params == 134_515_008
    assert _plan(WIDTH).stage("teacher").params == 8_030_261_248
    smol = ROOT / "configs" / "smollm2.yaml"
    with pytest.raises(PlanError, match="pass --hf-config"):
        _plan(smol, "model.load=/nowhere/Llama-3.1-8B")
    monkeypatch.chdir(ROOT)  # a checkout: configs/recipes/hf_configs/ under the working directory
    assert _plan(smol, "model.load=/nowhere/Llama-3.1-8B", "prune.export_config.hidden_size=3072",
                 "prune.export_config.ffn_hidden_size=9216", "train.global_batch_size=512").stage(
        "teacher").params == 8_030_261_248


def _compress(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "compress.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={"PYTHONWARNINGS": "ignore",
                                                                            "PATH": "/usr/bin:/bin"})


def test_cli_dry_run(tmp_path):
    out = tmp_path / "plan.json"
    proc = _compress("--config", str(WIDTH), "--dry-run", "--nodes", "8", "--mfu", "0.5", "--json", str(out),
                     "train.train_iters=1000")
    assert proc.returncode == 0, proc.stderr
    for text in ("TP 2 x PP 1 x DP 32", "round 1 distill", "student activations", "KD logits", "8,030,261,248",
                 "4,512,746,496", "fits"):
        assert text in proc.stdout
    plan = json.loads(out.read_text())
    assert plan["dp"] == 32 and plan["options"]["mfu"] == 0.5 and all(s["fits"] in (None, True)
                                                                      for s in plan["stages"])
    # refused: exit 2 and one line naming the reason
    proc = _compress("--config", str(WIDTH), "--dry-run", "parallel.tensor_model_parallel_size=1")
    assert proc.returncode == 2 and "does not fit" in proc.stderr and "Traceback" not in proc.stderr


def test_planner_flags_need_dry_run(monkeypatch):
    """Without --dry-run, launch/compress.py runs as before; planner flags are refused before anything starts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_compress", ROOT / "launch" / "compress.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", ["compress.py", "--config", str(WIDTH), "--nodes", "2"])
    with pytest.raises(MegaslimError, match="only work with --dry-run"):
        mod.main()
    args, rest = planner.parser().parse_known_args(["--config", "c.yaml", "a.b=1", "--dry-run", "x.y=2"])
    assert args.dry_run and args.config == "c.yaml" and rest == ["a.b=1", "x.y=2"]


def test_parameter_budget_plans_the_largest_candidate():
    unset = [f"prune.export_config.{k}=null" for k in ("hidden_size", "ffn_hidden_size")]
    p = _plan(WIDTH, *unset, "prune.target_params=4.5e9")
    from megaslim.prune.search import candidates

    src = planning.source_shape(load_config(WIDTH, unset), config_path=WIDTH)[0]
    best = candidates(src, 4.5e9, load_config(WIDTH).prune.search, tps=(2,))[0]
    plan_json = json.dumps(planner.to_json(p))
    assert best.num_params() <= 4.5e9 and f"{best.num_params():,}" in _render_text(p)
    assert "prune.target_params" in plan_json and "shape search: 5 candidates x 20" in plan_json
    p = _plan(WIDTH, "compress.teacher_correction_iters=100")
    assert any("teacher correction first: 100 LM-loss steps" in n for n in p.notes)
    with pytest.raises(PlanError, match="below the smallest shape"):
        _plan(WIDTH, *unset, "prune.target_params=1e9")


def _render_text(p) -> str:
    con = _quiet()
    planner.render(p, console=con)
    return con.file.getvalue()
