"""Held-out loss / perplexity of `model.load` on `data.eval_path` at any TP/PP/DP.

torchrun --nproc-per-node N launch/evaluate.py --config CONFIG [key.sub=value ...]
Writes <output_dir>/eval.json (loss, ppl, tokens, seq_length, num_samples).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaslim import io as mio  # noqa: E402
from megaslim import report  # noqa: E402
from megaslim.commands import cli  # noqa: E402
from megaslim.runtime import main_guard  # noqa: E402


def eval_rows(cfg, tokenizer, arch):
    from megaslim.data.packing import pack_rows, read_documents

    path = cfg.data.eval_path
    if path is None:
        from megaslim.data.corpora import default_corpus

        path = default_corpus("valid")
    return pack_rows(read_documents(path), tokenizer, seq_length=cfg.data.seq_length,
                     num_rows=cfg.eval.num_samples, what=f"data.eval_path={path}")


def main():
    cfg = cli.parse_args(__doc__)
    from megaslim.model.arch import check_parallel_layout
    from megaslim.sources import resolve_source, source_arch
    from megaslim.tokenizer import load_tokenizer

    timer = report.Timer()
    source = resolve_source(cfg.model.load)  # input checks before any distributed work
    arch = source_arch(source)
    check_parallel_layout(arch, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    tokenizer = load_tokenizer(cfg.model, source)
    rows = eval_rows(cfg, tokenizer, arch)

    rt = cli.start(cfg)
    from megaslim.eval import evaluate_rows
    from megaslim.sources import load_model

    model, arch, _ = load_model(cfg.model, source)
    result = evaluate_rows(model, rows, vocab_size=arch.vocab_size, micro_batch_size=cfg.data.micro_batch_size)
    result.update(model=source.label, eval_path=str(cfg.data.eval_path or "default valid split"),
                  tp=rt.tp, pp=rt.pp, dp=rt.dp, params=arch.num_params())
    out = Path(cfg.output_dir) / "eval.json"
    if rt.is_rank0:
        mio.write_json(out, result)
    report.summary_table("megaslim evaluate", [
        ("model", source.label), ("params", arch.num_params()),
        ("layout", f"TP={rt.tp} PP={rt.pp} DP={rt.dp}"),
        ("rows x seq_length", f"{result['num_samples']} x {result['seq_length']}"),
        ("tokens", result["tokens"]), ("loss", result["loss"]), ("ppl", result["ppl"]),
        ("seconds", round(timer.seconds, 1)), ("results", out),
    ])


if __name__ == "__main__":
    main_guard(main)
