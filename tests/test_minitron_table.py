"""bench/minitron (the Minitron table) without models: the row list, SE and paired SE against direct
formulas, the verdicts generated for constructed numbers, the markdown writer, launcher error parsing,
the parameter counts, and the two documented ways to start it."""
import dataclasses
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bench.minitron import cli, report, rows, stages, stats, workers
from megaslim.model.arch import ModelArch

ROOT = Path(__file__).resolve().parents[1]


def test_rows_are_consistent_data():
    ids = [r.id for r in rows.ROWS]
    assert len(ids) == len(set(ids))
    for r in rows.ROWS:
        assert r.student in rows.STUDENTS and r.train in rows.TRAININGS
        assert (r.tokens == 0) == (r.train == "none")
    assert rows.REFERENCE in ids
    for c in rows.CLAIMS:
        assert c.a in ids and c.b in ids and c.expect in ("a<b", "no_gain")
    for _, a, b in rows.EFFECTS:
        assert a in ids and b in ids
    for sid in ("width", "depth", "heads", "heads_fold", "scratch", "teacher"):  # the paper's comparisons
        assert sid in rows.STUDENTS
    assert rows.STUDENTS["scratch"].like == "width"
    # the sparsity / contrastive rows of issue 12
    assert {"mag50_none", "mag50_kd", "wanda50_none", "wanda50_kd", "wanda24_none", "wanda24_kd",
            "depth_contrastive"} <= set(ids)
    assert all(rows.STUDENTS[r.student].sparsity == 0.5 for r in rows.ROWS if r.id.startswith(("mag", "wanda")))
    # the shapes the repo uses everywhere (tests/test_prune_quality.py TARGETS, configs/smollm2_cpu.yaml)
    assert rows.WIDTH == {"hidden_size": 468, "ffn_hidden_size": 750}
    assert rows.HEADS == {"num_attention_heads": 6, "ffn_hidden_size": 642}
    assert rows.WIDTH_MID["hidden_size"] % 9 == 0  # HF-exportable with 9 heads


def test_select_rows_ids_and_globs():
    assert [r.id for r in rows.select_rows("teacher,depth_*")] == ["teacher", "depth_none", "depth_kd",
                                                                  "depth_inter", "depth_contrastive"]
    assert len(rows.select_rows(None)) == len(rows.ROWS)
    with pytest.raises(SystemExit, match="nope"):
        rows.select_rows("width_kd,nope")


def test_std_err_and_paired_against_direct_formulas():
    a = [3.1, 2.7, 4.0, 3.3, 2.9, 3.6]
    b = [3.3, 2.8, 4.4, 3.2, 3.1, 3.9]
    assert stats.std_err(a) == pytest.approx(statistics.stdev(a) / math.sqrt(len(a)), rel=1e-12)
    d = [x - y for x, y in zip(a, b)]
    p = stats.paired(a, b)
    assert p["diff"] == pytest.approx(statistics.mean(a) - statistics.mean(b), abs=1e-12)
    assert p["se"] == pytest.approx(statistics.stdev(d) / math.sqrt(len(d)), rel=1e-12)
    assert p["significant"] == (abs(p["diff"]) > 2 * p["se"])
    # pairing removes the shared row difficulty: far smaller than the unpaired SE of the difference
    assert p["se"] < math.hypot(stats.std_err(a), stats.std_err(b))
    assert math.isnan(stats.std_err([1.0]))
    with pytest.raises(ValueError):
        stats.paired([1.0, 2.0], [1.0])


def _rows(**losses):
    return {k: {"label": k, "status": "ok", "row_losses": v, "loss": sum(v) / len(v)} for k, v in losses.items()}


def test_verdicts_from_constructed_numbers():
    base = [3.0, 4.0, 5.0, 3.5, 4.5]
    better = [x - 0.2 + 0.01 * i for i, x in enumerate(base)]  # clearly lower, small spread of differences
    noisy = [x + (0.3 if i % 2 else -0.3) for i, x in enumerate(base)]  # mean diff ~0, large spread
    a_lt_b = rows.Claim("t", "p", "a", "b", "a<b")
    held = stats.verdict(a_lt_b, _rows(a=better, b=base))
    assert held["outcome"] == "held" and held["text"].startswith("Held: a has the lower loss")
    assert stats.verdict(a_lt_b, _rows(a=base, b=better))["outcome"] == "did not hold"
    ns = stats.verdict(a_lt_b, _rows(a=noisy, b=base))
    assert ns["outcome"] == "not shown" and "do not differ beyond 2 SE" in ns["text"]
    no_gain = rows.Claim("t", "p", "a", "b", "no_gain")
    assert stats.verdict(no_gain, _rows(a=noisy, b=base))["outcome"] == "held"
    assert stats.verdict(no_gain, _rows(a=base, b=better))["outcome"] == "held"  # a worse: still no gain
    assert stats.verdict(no_gain, _rows(a=better, b=base))["outcome"] == "did not hold"
    missing = stats.verdict(a_lt_b, {"a": {"status": "refused: needs a projection"}, **_rows(b=base)})
    assert missing["outcome"] == "not measured" and "refused: needs a projection" in missing["text"]
    assert "not run" in stats.verdict(a_lt_b, _rows(a=base))["text"]


def test_markdown_writer():
    results = _rows(teacher=[3.0, 3.2, 3.1], width_kd=[4.0, 4.3, 4.1], depth_kd=[4.5, 4.9, 4.6])
    for r in results.values():
        r.update(params=76_187_124, params_non_embedding=53_180_000, tokens=8192, prune_seconds=30.0,
                 train_seconds=90.0)
    results["width_inter"] = {"label": "width_inter", "status": "refused: needs a projection", "tokens": 0}
    doc = {"meta": {"command": "python bench/minitron_table.py --small", "machine": "2 cores (nproc), Xeon",
                    "date": "2025-01-01 00:00 UTC", "wall_seconds": 600.0, "tokens": 8192, "steps_T": 8,
                    "tokens_per_step": 1024, "seq_length": 128, "micro_batch_size": 8, "global_batch_size": 8,
                    "lr": 1e-3, "min_lr": 1e-4, "eval_rows": 3, "eval_path": "the default validation split",
                    "config": "configs/smollm2_cpu.yaml", "depth_layers": 15},
           "reference": "width_kd", "order": ["teacher", "width_kd", "width_inter", "depth_kd"], "rows": results,
           "claims": [{"topic": "width vs depth", "paper": "width wins",
                       **stats.verdict(rows.CLAIMS[0], results)}], "effects": []}
    md = report.render_markdown(doc)
    assert "Command: `python bench/minitron_table.py --small`" in md and "2 cores (nproc), Xeon" in md
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + 4  # header + one line per row, in order
    assert "(`width_kd`)" in table[2] and "| ref |" in table[2]
    p = stats.paired(results["depth_kd"]["row_losses"], results["width_kd"]["row_losses"])
    assert f"{p['diff']:+.4f} ± {p['se']:.4f}" in table[4]
    assert f"{math.exp(results['teacher']['loss']):.1f}" in table[1]
    assert "refused: needs a projection" in table[3] and "| - | - | - | - |" in table[3]
    assert "76.19M (53.18M)" in table[1] and "| 120 |" in table[1]
    assert "**width vs depth** (paper: width wins). Held: width_kd has the lower loss" in md
    assert "results_loss_curves.png" in md


def test_failure_message_and_helpers():
    err = "some log\nTraceback ...\n[rank 0] error: distill.intermediate_layer_pairs between hidden 468 needs x\n"
    assert stages.failure_message("noise\nerror: bad thing\n") == ("refused", "bad thing")
    assert stages.failure_message(err)[0] == "refused"
    kind, msg = stages.failure_message("Traceback (most recent call last):\n  File x\nRuntimeError: boom\nexit 1\n")
    assert (kind, msg) == ("failed", "RuntimeError: boom")
    assert rows.intermediate_pairs(list(range(30))) == [[14, 14], [29, 29]]
    assert rows.intermediate_pairs([0, 1, 2, 5, 7, 9]) == [[2, 2], [5, 9]]
    assert rows.steps_for(8192, 1024) == 8 and rows.steps_for(100, 1024) == 1


def test_effects_and_claims_from_constructed_numbers():
    base = [3.0, 4.0, 5.0, 3.5, 4.5]
    better = [x - 0.2 + 0.01 * i for i, x in enumerate(base)]
    results = _rows(width_kd=better, depth_kd=base, heads_fold_none=better, heads_none=base)
    claims = stats.claim_verdicts(results)
    assert [c["topic"] for c in claims] == [c.topic for c in rows.CLAIMS]
    assert claims[0]["outcome"] == "held" and claims[1]["outcome"] == "not measured"
    effects = stats.measured_effects(results)
    assert [(e["a"], e["b"]) for e in effects] == [("heads_fold_none", "heads_none")]
    assert effects[0]["diff"] == pytest.approx(stats.paired(better, base)["diff"])
    assert effects[0]["text"].startswith("heads_fold_none has the lower loss")


SMOLLM2 = ModelArch(num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9,
                    num_query_groups=3, kv_channels=64, vocab_size=49152, tie_word_embeddings=True)


def test_non_embedding_params_tied_and_untied():
    untied = dataclasses.replace(SMOLLM2, tie_word_embeddings=False)
    emb = SMOLLM2.vocab_size * SMOLLM2.hidden_size
    assert untied.num_params() == SMOLLM2.num_params() + emb  # the untied output layer is its own matrix
    assert workers.non_embedding_params(SMOLLM2) == SMOLLM2.num_params() - emb
    # input embedding and output layer both excluded when untied: the same count as the tied model
    assert workers.non_embedding_params(untied) == untied.num_params() - 2 * emb
    assert workers.non_embedding_params(untied) == workers.non_embedding_params(SMOLLM2)
    assert round(workers.non_embedding_params(SMOLLM2) / 1e6, 2) == 106.20  # docs/results.md, teacher row


@pytest.mark.parametrize("command", [[str(ROOT / "bench" / "minitron_table.py")], ["-m", "bench.minitron"]])
def test_documented_commands_start(command, tmp_path):
    res = subprocess.run([sys.executable, *command, "--list"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert [ln.split()[0] for ln in res.stdout.splitlines()] == [r.id for r in rows.ROWS]
    bad = subprocess.run([sys.executable, *command, "--rows", "nope"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120) if command[0].endswith(".py") else None
    if bad is not None:  # started from another folder: the script still finds its package
        assert bad.returncode != 0 and "--rows: no row matches ['nope']" in bad.stderr
    assert cli.COMMAND == "python bench/minitron_table.py"
