"""What the Minitron table runs: shapes, students, trainings, rows and the paper's claims (plain data)."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Optional

WIDTH = {"hidden_size": 468, "ffn_hidden_size": 750}  # Llama-3.1-Minitron-4B-Width analogue
WIDTH_MID = {"hidden_size": 522, "ffn_hidden_size": 1143}  # halfway on each axis; 522 = 9 x 58 (HF export)
HEADS = {"num_attention_heads": 6, "ffn_hidden_size": 642}  # 3 groups x 2 heads, hidden kept
DEPTH_LAYERS = 15  # 30 -> 15 layers: same non-embedding params as WIDTH (53.10M vs 53.18M, docs/pruning.md)
UNSET_SHAPE = ("prune.export_config.hidden_size=null", "prune.export_config.ffn_hidden_size=null")


def _shape(shape: dict) -> tuple[str, ...]:
    """Overrides that set prune.export_config to exactly `shape` (the config's own target unset first)."""
    return UNSET_SHAPE + tuple(f"prune.export_config.{k}={v}" for k, v in shape.items())


@dataclass(frozen=True)
class Student:
    """How a student is built. kind: teacher (the source model) | prune (launch/prune.py with the shared
    importance scores and `overrides`) | scratch (random init of the `like` student's shape)."""
    kind: str
    overrides: tuple[str, ...] = ()
    like: Optional[str] = None
    sparsity: Optional[float] = None  # expected fraction of zero decoder weights, checked after pruning


STUDENTS: dict[str, Student] = {
    "teacher": Student("teacher"),
    "width": Student("prune", _shape(WIDTH)),
    "depth": Student("prune", _shape({"num_layers": "{depth_layers}"})),
    "heads": Student("prune", _shape(HEADS)),
    "heads_fold": Student("prune", _shape(HEADS) + ("prune.fold_heads=true",)),
    "scratch": Student("scratch", like="width"),
    "mag50": Student("prune", UNSET_SHAPE + ("prune.sparsity.method=magnitude", "prune.sparsity.ratio=0.5"),
                     sparsity=0.5),
    "wanda50": Student("prune", UNSET_SHAPE + ("prune.sparsity.method=wanda", "prune.sparsity.ratio=0.5"),
                       sparsity=0.5),
    "wanda24": Student("prune", UNSET_SHAPE + ("prune.sparsity.method=wanda", "prune.sparsity.pattern=2:4"),
                       sparsity=0.5),
}

LM = ("distill.kd_loss_scale=0", "distill.skip_lm_loss=false")
# How a student is trained. "{pairs}" is filled from the student's prune plan (intermediate_pairs).
TRAININGS: dict[str, tuple[str, ...]] = {
    "none": (),
    "kd": (),
    "lm": LM,
    "kd_inter": ("distill.intermediate_layer_pairs={pairs}", "distill.intermediate_loss=cosine"),
    "kd_contrastive": ("distill.intermediate_layer_pairs={pairs}", "distill.intermediate_loss=contrastive"),
    "synthetic": LM,  # after launch/generate.py: data.train_path=<synthetic.jsonl>
    "iterative": (),  # launch/compress.py: rounds WIDTH_MID -> WIDTH, T/2 of logit KD each
}


@dataclass(frozen=True)
class Row:
    id: str
    label: str
    student: str  # key of STUDENTS
    train: str  # key of TRAININGS
    tokens: float = 1.0  # multiple of T (0 for no retraining)


ROWS: list[Row] = [
    Row("teacher", "teacher (SmolLM2-135M)", "teacher", "none", 0),
    Row("width_none", "width: no retraining", "width", "none", 0),
    Row("width_lm", "width: LM-loss retraining T", "width", "lm"),
    Row("width_kd", "width: logit KD T", "width", "kd"),
    Row("width_inter", "width: logit+intermediate KD T", "width", "kd_inter"),
    Row("width_synth", "width: synthetic-data fine-tuning T", "width", "synthetic"),
    Row("depth_none", "depth: no retraining", "depth", "none", 0),
    Row("depth_kd", "depth: logit KD T", "depth", "kd"),
    Row("depth_inter", "depth: logit+intermediate KD T", "depth", "kd_inter"),
    Row("width_iter", "width: iterative, 2 rounds x T/2 logit KD", "width", "iterative"),
    Row("heads_none", "heads: no folding, no retraining", "heads", "none", 0),
    Row("heads_fold_none", "heads: folding, no retraining", "heads_fold", "none", 0),
    Row("heads_kd", "heads: no folding, logit KD T", "heads", "kd"),
    Row("heads_fold_kd", "heads: folding, logit KD T", "heads_fold", "kd"),
    Row("scratch_T", "width shape, random init, LM T", "scratch", "lm"),
    Row("scratch_10T", "width shape, random init, LM 10T", "scratch", "lm", 10.0),
    Row("depth_contrastive", "depth: logit+contrastive KD T", "depth", "kd_contrastive"),
    Row("mag50_none", "50% unstructured magnitude: no retraining", "mag50", "none", 0),
    Row("mag50_kd", "50% unstructured magnitude: logit KD T", "mag50", "kd"),
    Row("wanda50_none", "50% unstructured Wanda: no retraining", "wanda50", "none", 0),
    Row("wanda50_kd", "50% unstructured Wanda: logit KD T", "wanda50", "kd"),
    Row("wanda24_none", "2:4 Wanda: no retraining", "wanda24", "none", 0),
    Row("wanda24_kd", "2:4 Wanda: logit KD T", "wanda24", "kd"),
]
REFERENCE = "width_kd"  # the paired-difference column is against this row


@dataclass(frozen=True)
class Claim:
    """A paper claim checked on rows a and b. expect "a<b": a has the lower loss; "no_gain": a is not
    lower than b (the paper saw no benefit from a)."""
    topic: str
    paper: str
    a: str
    b: str
    expect: str


CLAIMS: list[Claim] = [
    Claim("width vs depth", "width-pruned students beat depth-pruned ones of the same size after distillation",
          "width_kd", "depth_kd", "a<b"),
    Claim("KD vs LM-loss retraining", "retraining with logit distillation beats retraining with the LM loss "
          "at equal tokens", "width_kd", "width_lm", "a<b"),
    Claim("logit-only vs logit+intermediate (depth)", "when depth is cut a lot, adding intermediate-state "
          "distillation to the logit loss helps", "depth_inter", "depth_kd", "a<b"),
    Claim("logit-only vs logit+intermediate (width)", "when depth is kept, logit-only distillation is enough "
          "(intermediate states add nothing)", "width_inter", "width_kd", "no_gain"),
    Claim("one-shot vs iterative", "iterating prune -> distill gives no gain over one-shot pruning at equal "
          "tokens", "width_iter", "width_kd", "no_gain"),
    Claim("pruned+KD vs scratch at 10x tokens", "a pruned and distilled student beats the same architecture "
          "trained from scratch on many more tokens", "width_kd", "scratch_10T", "a<b"),
]
# Measured effects without a paper claim to test: (label, a, b).
EFFECTS: list[tuple[str, str, str]] = [
    ("head folding, no retraining (folding - no folding)", "heads_fold_none", "heads_none"),
    ("head folding after logit KD T (folding - no folding)", "heads_fold_kd", "heads_kd"),
    ("synthetic-data fine-tuning - LM retraining on real data", "width_synth", "width_lm"),
    ("width: no retraining - depth: no retraining", "width_none", "depth_none"),
    ("contrastive - cosine intermediate loss (depth)", "depth_contrastive", "depth_inter"),
    ("50% magnitude + KD - width KD", "mag50_kd", "width_kd"),
    ("50% Wanda + KD - width KD", "wanda50_kd", "width_kd"),
    ("2:4 Wanda + KD - width KD", "wanda24_kd", "width_kd"),
]


def select_rows(spec: Optional[str], rows: list[Row] = ROWS) -> list[Row]:
    """Rows whose id matches one of the comma-separated ids / glob patterns (all when spec is empty)."""
    if not spec:
        return list(rows)
    pats = [p.strip() for p in spec.split(",") if p.strip()]
    unknown = [p for p in pats if not any(fnmatch.fnmatchcase(r.id, p) for r in rows)]
    if unknown:
        raise SystemExit(f"--rows: no row matches {unknown}; ids: {', '.join(r.id for r in rows)}")
    return [r for r in rows if any(fnmatch.fnmatchcase(r.id, p) for p in pats)]


def intermediate_pairs(keep_layers: list[int]) -> list[list[int]]:
    """Student middle and last layer, each paired with the teacher layer it was copied from."""
    n = len(keep_layers)
    return [[i, keep_layers[i]] for i in sorted({n // 2 - 1, n - 1}) if i >= 0]


def steps_for(tokens: float, tokens_per_step: int) -> int:
    """Training steps for about `tokens` tokens (at least one)."""
    return max(1, round(tokens / tokens_per_step))
