"""Benchmark: logit KD vs plain LM-loss retraining of the same pruned student at equal tokens.

python bench/kd_vs_lm.py --student PRUNED_CHECKPOINT [--steps 40] [--config configs/smollm2_cpu.yaml]
Both runs start from the same pruned checkpoint, read the same batches (same seed) and are scored on
the same held-out rows; writes docs/kd_vs_lm.md.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(name, student, steps, config, out_root, extra):
    out = out_root / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", str(ROOT / "launch" / "distill.py"),
           "--config", config, f"distill.student.load={student}", f"train.train_iters={steps}",
           f"output_dir={out}", f"eval.interval={steps}", *extra]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return json.loads((out / "distill.json").read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True, help="pruned torch_dist checkpoint (e.g. from launch/prune.py)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2_cpu.yaml"))
    ap.add_argument("--out-root", default="/tmp/megaslim_kd_vs_lm")
    ap.add_argument("--out", default=str(ROOT / "docs" / "kd_vs_lm.md"))
    args = ap.parse_args()
    out_root = Path(args.out_root)
    kd = run("kd", args.student, args.steps, args.config, out_root, [])
    lm = run("lm", args.student, args.steps, args.config, out_root,
             ["distill.kd_loss_scale=0", "distill.skip_lm_loss=false"])
    gap = kd["student_eval_loss_start"] - kd["teacher_eval_loss"]
    lines = ["# Logit KD vs LM-loss retraining (equal tokens)", "",
             f"Student: `{args.student}`; {args.steps} steps, {kd['tokens']:,} tokens each; config "
             f"`{Path(args.config).name}`; held-out loss on the default validation split.", "",
             "| run | held-out loss start | held-out loss end | gap to teacher recovered |", "|---|---|---|---|"]
    for name, r in (("logit KD (forward KL)", kd), ("LM loss only", lm)):
        rec = (r["student_eval_loss_start"] - r["student_eval_loss"]) / gap
        lines.append(f"| {name} | {r['student_eval_loss_start']:.4f} | {r['student_eval_loss']:.4f} | {rec:.1%} |")
    lines += ["", f"Teacher held-out loss: {kd['teacher_eval_loss']:.4f}.", "",
              f"Command: `python bench/kd_vs_lm.py --student {args.student} --steps {args.steps}`", ""]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
