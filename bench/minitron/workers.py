"""The bench's own stages, run as `python -m bench.minitron.workers MODE SPEC` (they initialise
torch.distributed): held-out evaluation with per-row losses, and random-init students."""
from __future__ import annotations

import gc
import json
import sys
import traceback
from pathlib import Path

import torch

from megaslim.checkpoint import save_checkpoint
from megaslim.config import load_config
from megaslim.data.corpora import data_path
from megaslim.data.heldout import heldout_rows
from megaslim.eval import evaluate_rows
from megaslim.io import write_json
from megaslim.model.arch import ModelArch
from megaslim.model.build import build_gpt
from megaslim.runtime import init_runtime, main_guard
from megaslim.sources import load_model, resolve_source, source_arch
from megaslim.tokenizer import load_tokenizer


def non_embedding_params(arch: ModelArch) -> int:
    """Parameters outside the vocabulary matrices: the input embedding, and the output layer too when it
    is not tied to the embedding (num_params counts a tied matrix once)."""
    return arch.num_params() - arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)


def zero_fraction(model) -> float:
    """Fraction of exact zeros in the decoder's linear weights (what sparsity pruning sets)."""
    zeros = total = 0
    for name, p in model.named_parameters():
        if "decoder.layers" in name and p.dim() == 2:
            zeros += int((p == 0).sum())
            total += p.numel()
    return zeros / max(total, 1)


def eval_one(cfg, source, rows) -> dict:
    """Parameter counts and zero fraction of `source`'s model, and (rows given) its loss on each row."""
    model, arch, _ = load_model(cfg.model, source)
    out = {"params": arch.num_params(), "params_non_embedding": non_embedding_params(arch),
           "zero_fraction": zero_fraction(model), "model": source.label}
    if rows is None:
        return out
    per_row, row_tokens = [], []
    with torch.no_grad():
        for i in range(rows.shape[0]):
            r = evaluate_rows(model, rows[i:i + 1], vocab_size=arch.vocab_size, micro_batch_size=1)
            per_row.append(r["loss"])
            row_tokens.append(r["tokens"])
    del model
    tokens = sum(row_tokens)  # the pinned protocol's loss: mean over every predicted token
    return {**out, "row_losses": per_row, "row_tokens": row_tokens, "tokens": tokens,
            "loss": sum(x * n for x, n in zip(per_row, row_tokens)) / tokens}


def eval_worker(spec: dict) -> dict:
    """Each item's model scored on the same held-out rows, one row at a time (evaluate_rows), so the
    loss comes with per-row losses; writes item["out"] per item (an item that fails: {"error"})."""
    cfg = load_config(spec["config"])
    teacher = resolve_source(cfg.model.load)
    rows = path = None
    if not spec.get("zeros_only"):
        tokenizer = load_tokenizer(cfg.model, teacher)  # the teacher's: the same rows for every model
        path = data_path(spec["eval_path"], "data.eval_path")
        rows = heldout_rows(spec["eval_path"], tokenizer, seq_length=spec["seq_length"],
                            num_samples=spec["num_rows"])
    init_runtime(tp=1, pp=1, seed=cfg.train.seed)
    done = {}
    for item in spec["items"]:
        try:
            res = eval_one(cfg, resolve_source(item["load"]) if item["load"] else teacher, rows)
            if path is not None:
                res["eval_path"] = str(path)
        except Exception as err:  # one model's failure is that row's status, not the batch's
            traceback.print_exc()
            res = {"error": f"{type(err).__name__}: {err}"}
        write_json(item["out"], res)
        done[item["id"]] = "error" not in res
        gc.collect()
    return done


def init_worker(spec: dict) -> dict:
    """A random-init checkpoint of the shape of spec["like"] (megaslim's build_gpt initialisation)."""
    cfg = load_config(spec["config"])
    like = resolve_source(spec["like"])
    arch = source_arch(like)
    init_runtime(tp=1, pp=1, seed=spec["seed"])
    torch.manual_seed(spec["seed"])
    model = build_gpt(arch, cfg.model, init_weights=True)
    tok_dir = like.tokenizer_dir or resolve_source(cfg.model.load).tokenizer_dir
    path = save_checkpoint(model, arch, Path(spec["out_dir"]) / "checkpoint", 0, tokenizer_dir=tok_dir,
                           extra={"random_init_like": spec["like"], "seed": spec["seed"]})
    return {"checkpoint": str(path.parent), "params": arch.num_params()}


WORKERS = {"eval": eval_worker, "init": init_worker}


def main(argv=None) -> None:
    """MODE SPEC: run WORKERS[MODE] on SPEC (x.spec.json) and write its result to x.json."""
    mode, spec_path = argv if argv is not None else sys.argv[1:]
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec_path).with_name(Path(spec_path).name.replace(".spec.json", ".json"))
    main_guard(lambda: write_json(out, WORKERS[mode](spec)))


if __name__ == "__main__":
    main()
