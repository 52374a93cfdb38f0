"""Building, pruning, training and scoring the model of every row through the real launchers."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

from bench.minitron.rows import STUDENTS, TRAININGS, WIDTH, WIDTH_MID, Row, intermediate_pairs, steps_for
from bench.minitron.settings import settings_tag
from bench.minitron.stages import StageError, child_env, launch, run_worker
from bench.minitron.stats import std_err


class Bench:
    """One bench run: stages under out_dir/<settings tag>/, finished ones reused, students cached."""

    def __init__(self, args):
        self.args = args
        self.out = Path(args.out_dir) / settings_tag(args)  # runs with other settings never mix
        self.out.mkdir(parents=True, exist_ok=True)
        self.env = child_env(args.threads)
        self.cache: dict[str, object] = {}

    # -- plumbing -------------------------------------------------------------------------------------
    def common(self) -> list[str]:
        a = self.args
        o = [f"data.seq_length={a.seq_length}", f"eval.num_samples={a.eval_rows}", "export.hf_dir=null"]
        if a.eval_path:
            o.append(f"data.eval_path={a.eval_path}")
        return o

    def launch(self, script: str, overrides: list[str], out_dir: Path, done: str, what: str) -> tuple[dict, float]:
        return launch(script, self.args.config, overrides, out_dir, done, what, env=self.env,
                      retry_failed=self.args.retry_failed)

    def schedule(self, steps: int) -> list[str]:
        """Training length overrides: `steps` steps, warm-up at most half of them, two evaluations."""
        return [f"train.train_iters={steps}", f"train.warmup_iters={min(self.args.warmup, steps // 2)}",
                f"eval.interval={max(1, steps // 2)}"]

    # -- students -------------------------------------------------------------------------------------
    def importance(self) -> Path:
        d = self.out / "importance"
        # importance.only writes importance.safetensors and importance.json (no prune.json)
        self.launch("prune.py", self.common() + ["importance.only=true"], d, "importance.json",
                    "importance (once, reused by every prune)")
        return d / "importance.safetensors"

    def student(self, key: str) -> dict:
        """{"load": checkpoint or None (teacher), "prune_seconds", "plan": path or None}; cached (a
        failure too, so every row of that student reports it without a rerun)."""
        if key not in self.cache:
            try:
                self.cache[key] = self._student(key)
            except StageError as err:
                self.cache[key] = err
        c = self.cache[key]
        if isinstance(c, StageError):
            raise c
        return c

    def _student(self, key: str) -> dict:
        s = STUDENTS[key]
        if s.kind == "teacher":
            return {"load": None, "prune_seconds": 0.0, "plan": None}
        d = self.out / "students" / key
        if s.kind == "scratch":
            base = self.student(s.like)
            t0 = time.time()
            run_worker("init", {"like": base["load"], "out_dir": str(d), "seed": 1234,
                                "config": str(self.args.config)}, d / "init.json",
                       f"random init of the {s.like} shape", env=self.env)
            return {"load": str(d / "checkpoint"), "prune_seconds": time.time() - t0, "plan": None}
        overrides = [o.replace("{depth_layers}", str(self.args.depth_layers)) for o in s.overrides]
        _, seconds = self.launch("prune.py", self.common() + [f"importance.scores_path={self.importance()}",
                                                              *overrides], d, "prune.json", f"prune {key}")
        info = {"load": str(d / "checkpoint"), "prune_seconds": seconds, "plan": str(d / "prune_plan.json")}
        if s.sparsity is not None:
            self._check_sparsity(key, info["load"], d / "zeros.json")
        return info

    def _check_sparsity(self, key: str, load: str, out: Path) -> None:
        """Refuse a sparsity student whose decoder weights are not as sparse as asked."""
        s = STUDENTS[key]
        z = self.evaluate({"zeros": (load, out)}, zeros_only=True)["zeros"]
        if "error" in z:
            raise StageError("failed", f"sparsity check: {z['error']}")
        if z["zero_fraction"] < 0.9 * s.sparsity:
            raise StageError("failed", f"{' '.join(o for o in s.overrides if 'sparsity' in o)} was "
                             f"accepted but the pruned decoder weights are {z['zero_fraction']:.1%} zeros "
                             "(the sparsity feature has not landed)")

    # -- evaluation -------------------------------------------------------------------------------------
    def evaluate(self, items: dict[str, tuple[Optional[str], Path]], zeros_only: bool = False) -> dict[str, dict]:
        """{id: (checkpoint or None for the teacher, output json)} -> {id: result}, in one worker process
        for all the items whose output does not exist yet (a failed item: {"error": message})."""
        todo = {k: v for k, v in items.items() if not v[1].is_file()}
        if todo:
            a = self.args
            spec = {"eval_path": a.eval_path, "seq_length": a.seq_length, "num_rows": a.eval_rows,
                    "config": str(a.config), "zeros_only": zeros_only,
                    "items": [{"id": k, "load": load, "out": str(out)} for k, (load, out) in todo.items()]}
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_worker("eval", spec, self.out / "eval" / f"batch-{stamp}-{os.getpid()}.json",
                       ("sparsity check of " if zeros_only else "held-out evaluation of ") + ", ".join(todo),
                       env=self.env)
        return {k: json.loads(out.read_text()) if out.is_file() else {"error": "no result written"}
                for k, (_, out) in items.items()}

    # -- training ---------------------------------------------------------------------------------------
    def train_overrides(self, row: Row, student: dict) -> list[str]:
        a = self.args
        o = [*self.common(), *self.schedule(steps_for(row.tokens * a.tokens, a.tokens_per_step))]
        if student["load"]:
            o.append(f"distill.student.load={student['load']}")
        for item in TRAININGS[row.train]:
            if "{pairs}" in item:
                keep = json.loads(Path(student["plan"]).read_text())["keep_layers"]
                item = item.replace("{pairs}", json.dumps(intermediate_pairs(keep)).replace(" ", ""))
            o.append(item)
        return o

    def run_iterative(self, row: Row) -> dict:
        """launch/compress.py: WIDTH_MID then WIDTH, each round T/2 of logit KD from the original teacher."""
        steps = steps_for(row.tokens * self.args.tokens / 2, self.args.tokens_per_step)
        rounds = "[" + ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in r.items()) + "}"
                                for r in (WIDTH_MID, WIDTH)) + "]"
        d = self.out / "runs" / row.id
        res, seconds = self.launch("compress.py", [*self.common(), f"compress.rounds={rounds}",
                                                   "compress.teacher=original", *self.schedule(steps)],
                                   d, "compress.json", row.id)
        return {"load": res["rounds"][-1]["checkpoint"], "prune_seconds": 0.0, "train_seconds": seconds,
                "tokens": sum(r["tokens"] for r in res["rounds"]),
                "metrics": [str(d / f"round{i}" / "distill" / "metrics.jsonl") for i in (1, 2)],
                "notes": f"includes 2 importance+prune stages; {steps} steps per round"}

    def run_row(self, row: Row) -> dict:
        """Build + train the row's model; returns {"load", "prune_seconds", "train_seconds", "tokens",
        "metrics": [metrics.jsonl paths], "notes"}."""
        a = self.args
        if row.train == "iterative":
            return self.run_iterative(row)
        student = self.student(row.student)
        if row.train == "none":
            return {"load": student["load"], "prune_seconds": student["prune_seconds"], "train_seconds": 0.0,
                    "tokens": 0, "metrics": [], "notes": ""}
        overrides = self.train_overrides(row, student)
        extra_seconds, notes = 0.0, ""
        if row.train == "synthetic":
            gen = self.synthetic(steps_for(row.tokens * a.tokens, a.tokens_per_step) * a.tokens_per_step)
            overrides.append(f"data.train_path={gen['output']}")
            extra_seconds = gen["bench_seconds"]
            notes = (f"{gen['generated_tokens']:,} generated tokens ({gen['num_prompts']} prompts), "
                     f"generation {extra_seconds:.0f} s included")
        d = self.out / "runs" / row.id
        res, seconds = self.launch("distill.py", overrides, d, "distill.json", row.id)
        return {"load": res["checkpoint"], "prune_seconds": student["prune_seconds"],
                "train_seconds": seconds + extra_seconds, "tokens": res["tokens"],
                "metrics": [str(d / "metrics.jsonl")], "notes": notes}

    def synthetic(self, tokens: int) -> dict:
        """Teacher continuations of corpus prompts, about `tokens` tokens in all (launch/generate.py)."""
        prompt, new = 32, 96
        n = max(1, math.ceil(1.05 * tokens / (prompt + new)))
        res, seconds = self.launch("generate.py", [
            *self.common(), f"generate.num_prompts={n}", f"generate.prompt_length={prompt}",
            f"generate.max_new_tokens={new}", "generate.batch_size=32"], self.out / "synthetic", "generate.json",
            f"synthetic data ({n} prompts x ({prompt} + {new}) tokens)")
        return {**res, "bench_seconds": seconds}

    # -- everything -------------------------------------------------------------------------------------
    def run(self, rows: list[Row]) -> dict:
        """Every row built and trained (a failed stage is that row's status), then all scored at once."""
        results: dict[str, dict] = {}
        for row in rows:
            r: dict = {"label": row.label, "student": row.student, "train": row.train, "tokens": 0}
            try:
                r.update(self.run_row(row))
                r["status"] = "ok"
            except StageError as err:
                r["status"] = f"{err.kind}: {err.msg}"
            results[row.id] = r
        self.score([row for row in rows if results[row.id]["status"] == "ok"], results)
        return results

    def score(self, rows: list[Row], results: dict[str, dict]) -> None:
        """Held-out evaluation of `rows`' models, per eval row, into results[row.id]."""
        try:
            evals = self.evaluate({row.id: (results[row.id]["load"], self.out / "eval" / f"{row.id}.json")
                                   for row in rows})
        except StageError as err:
            evals = {row.id: {"error": err.msg} for row in rows}
        for row in rows:
            r, ev = results[row.id], evals[row.id]
            if "error" in ev:
                r["status"] = f"failed: evaluation: {ev['error']}"
                continue
            r.update(row_losses=ev["row_losses"], loss=ev["loss"], ppl=math.exp(ev["loss"]),
                     loss_se=std_err(ev["row_losses"]), params=ev["params"],
                     params_non_embedding=ev["params_non_embedding"], zero_fraction=ev["zero_fraction"],
                     eval_tokens=ev["tokens"])
            if STUDENTS[row.student].sparsity is not None:
                r["notes"] = "; ".join(x for x in (r.get("notes"), f"{ev['zero_fraction']:.1%} of decoder "
                                                   "linear weights are zero") if x)
