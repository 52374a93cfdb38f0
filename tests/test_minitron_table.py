"""bench/minitron_table.py without models: the row list, SE and paired SE against direct formulas, the
verdicts generated for constructed numbers, the markdown writer, launcher error parsing."""
import importlib.util
import math
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mt():
    spec = importlib.util.spec_from_file_location("minitron_table", ROOT / "bench" / "minitron_table.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["minitron_table"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_rows_are_consistent_data(mt):
    ids = [r.id for r in mt.ROWS]
    assert len(ids) == len(set(ids))
    for r in mt.ROWS:
        assert r.student in mt.STUDENTS and r.train in mt.TRAININGS
        assert (r.tokens == 0) == (r.train == "none")
    assert mt.REFERENCE in ids
    for c in mt.CLAIMS:
        assert c.a in ids and c.b in ids and c.expect in ("a<b", "no_gain")
    for _, a, b in mt.EFFECTS:
        assert a in ids and b in ids
    for sid in ("width", "depth", "heads", "heads_fold", "scratch", "teacher"):  # the paper's comparisons
        assert sid in mt.STUDENTS
    assert mt.STUDENTS["scratch"].like == "width"
    # the sparsity / contrastive rows of issue 12
    assert {"mag50_none", "mag50_kd", "wanda50_none", "wanda50_kd", "wanda24_none", "wanda24_kd",
            "depth_contrastive"} <= set(ids)
    assert all(mt.STUDENTS[r.student].sparsity == 0.5 for r in mt.ROWS if r.id.startswith(("mag", "wanda")))
    # the shapes the repo uses everywhere (tests/test_prune_quality.py TARGETS, configs/smollm2_cpu.yaml)
    assert mt.WIDTH == {"hidden_size": 468, "ffn_hidden_size": 750}
    assert mt.HEADS == {"num_attention_heads": 6, "ffn_hidden_size": 642}
    assert mt.WIDTH_MID["hidden_size"] % 9 == 0  # HF-exportable with 9 heads


def test_select_rows_ids_and_globs(mt):
    assert [r.id for r in mt.select_rows("teacher,depth_*")] == ["teacher", "depth_none", "depth_kd",
                                                                  "depth_inter", "depth_contrastive"]
    assert len(mt.select_rows(None)) == len(mt.ROWS)
    with pytest.raises(SystemExit, match="nope"):
        mt.select_rows("width_kd,nope")


def test_std_err_and_paired_against_direct_formulas(mt):
    a = [3.1, 2.7, 4.0, 3.3, 2.9, 3.6]
    b = [3.3, 2.8, 4.4, 3.2, 3.1, 3.9]
    assert mt.std_err(a) == pytest.approx(statistics.stdev(a) / math.sqrt(len(a)), rel=1e-12)
    d = [x - y for x, y in zip(a, b)]
    p = mt.paired(a, b)
    assert p["diff"] == pytest.approx(statistics.mean(a) - statistics.mean(b), abs=1e-12)
    assert p["se"] == pytest.approx(statistics.stdev(d) / math.sqrt(len(d)), rel=1e-12)
    assert p["significant"] == (abs(p["diff"]) > 2 * p["se"])
    # pairing removes the shared row difficulty: far smaller than the unpaired SE of the difference
    assert p["se"] < math.hypot(mt.std_err(a), mt.std_err(b))
    assert math.isnan(mt.std_err([1.0]))
    with pytest.raises(ValueError):
        mt.paired([1.0, 2.0], [1.0])


def _rows(**losses):
    return {k: {"label": k, "status": "ok", "row_losses": v, "loss": sum(v) / len(v)} for k, v in losses.items()}


def test_verdicts_from_constructed_numbers(mt):
    base = [3.0, 4.0, 5.0, 3.5, 4.5]
    better = [x - 0.2 + 0.01 * i for i, x in enumerate(base)]  # clearly lower, small spread of differences
    noisy = [x + (0.3 if i % 2 else -0.3) for i, x in enumerate(base)]  # mean diff ~0, large spread
    a_lt_b = mt.Claim("t", "p", "a", "b", "a<b")
    held = mt.verdict(a_lt_b, _rows(a=better, b=base))
    assert held["outcome"] == "held" and held["text"].startswith("Held: a has the lower loss")
    assert mt.verdict(a_lt_b, _rows(a=base, b=better))["outcome"] == "did not hold"
    ns = mt.verdict(a_lt_b, _rows(a=noisy, b=base))
    assert ns["outcome"] == "not shown" and "do not differ beyond 2 SE" in ns["text"]
    no_gain = mt.Claim("t", "p", "a", "b", "no_gain")
    assert mt.verdict(no_gain, _rows(a=noisy, b=base))["outcome"] == "held"
    assert mt.verdict(no_gain, _rows(a=base, b=better))["outcome"] == "held"  # a worse: still no gain
    assert mt.verdict(no_gain, _rows(a=better, b=base))["outcome"] == "did not hold"
    missing = mt.verdict(a_lt_b, {"a": {"status": "refused: needs a projection"}, **_rows(b=base)})
    assert missing["outcome"] == "not measured" and "refused: needs a projection" in missing["text"]
    assert "not run" in mt.verdict(a_lt_b, _rows(a=base))["text"]


def test_markdown_writer(mt):
    rows = _rows(teacher=[3.0, 3.2, 3.1], width_kd=[4.0, 4.3, 4.1], depth_kd=[4.5, 4.9, 4.6])
    for r in rows.values():
        r.update(params=76_187_124, params_non_embedding=53_180_000, tokens=8192, prune_seconds=30.0,
                 train_seconds=90.0)
    rows["width_inter"] = {"label": "width_inter", "status": "refused: needs a projection", "tokens": 0}
    doc = {"meta": {"command": "python bench/minitron_table.py --small", "machine": "2 cores (nproc), Xeon",
                    "date": "2025-01-01 00:00 UTC", "wall_seconds": 600.0, "tokens": 8192, "steps_T": 8,
                    "tokens_per_step": 1024, "seq_length": 128, "micro_batch_size": 8, "global_batch_size": 8,
                    "lr": 1e-3, "min_lr": 1e-4, "eval_rows": 3, "eval_path": "the default validation split",
                    "config": "configs/smollm2_cpu.yaml", "depth_layers": 15},
           "reference": "width_kd", "order": ["teacher", "width_kd", "width_inter", "depth_kd"], "rows": rows,
           "claims": [{"topic": "width vs depth", "paper": "width wins",
                       **mt.verdict(mt.CLAIMS[0], rows)}], "effects": []}
    md = mt.render_markdown(doc)
    assert "Command: `python bench/minitron_table.py --small`" in md and "2 cores (nproc), Xeon" in md
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + 4  # header + one line per row, in order
    assert "(`width_kd`)" in table[2] and "| ref |" in table[2]
    p = mt.paired(rows["depth_kd"]["row_losses"], rows["width_kd"]["row_losses"])
    assert f"{p['diff']:+.4f} ± {p['se']:.4f}" in table[4]
    assert f"{math.exp(rows['teacher']['loss']):.1f}" in table[1]
    assert "refused: needs a projection" in table[3] and "| - | - | - | - |" in table[3]
    assert "76.19M (53.18M)" in table[1] and "| 120 |" in table[1]
    assert "**width vs depth** (paper: width wins). Held: width_kd has the lower loss" in md
    assert "results_loss_curves.png" in md


def test_failure_message_and_helpers(mt):
    err = "some log\nTraceback ...\n[rank 0] error: distill.intermediate_layer_pairs between hidden 468 needs x\n"
    assert mt.failure_message("noise\nerror: bad thing\n") == ("refused", "bad thing")
    assert mt.failure_message(err)[0] == "refused"
    kind, msg = mt.failure_message("Traceback (most recent call last):\n  File x\nRuntimeError: boom\nexit 1\n")
    assert (kind, msg) == ("failed", "RuntimeError: boom")
    assert mt.intermediate_pairs(list(range(30))) == [[14, 14], [29, 29]]
    assert mt.intermediate_pairs([0, 1, 2, 5, 7, 9]) == [[2, 2], [5, 9]]
    assert mt.steps_for(8192, 1024) == 8 and mt.steps_for(100, 1024) == 1
