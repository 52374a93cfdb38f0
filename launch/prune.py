"""Minitron pruning: importance scores from calibration activations, then width/depth pruning.

torchrun --nproc-per-node N launch/prune.py --config CONFIG [key.sub=value ...]
`importance.only=true` computes and saves the scores and plots without pruning:
<output_dir>/importance.safetensors, importance.json, importance_*.png.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaslim import cli  # noqa: E402
from megaslim.runtime import main_guard  # noqa: E402


def score_table(scores, cost, out_dir):
    import torch

    rows = [
        ("calibration", f"{scores.settings.get('num_samples')} samples x {scores.settings.get('seq_length')} tokens"),
        ("aggregation", f"seq_agg={scores.settings.get('seq_agg')} batch_agg={scores.settings.get('batch_agg')} "
                        f"neuron_signal={scores.settings.get('neuron_signal')}"),
        ("least important layers (BI)", torch.argsort(scores.layer_bi)[:5].tolist()),
    ]
    if scores.layer_loss is not None:
        rows.append(("least important layers (loss)", torch.argsort(scores.layer_loss)[:5].tolist()))
    if cost:
        rows += [("seconds", round(cost["seconds"], 1)), ("tokens/s (activation pass)", round(cost["tokens_per_second"]))]
    rows.append(("outputs", out_dir))
    cli.summary_table("megaslim importance", rows)


def main():
    cfg = cli.parse_args(__doc__)
    from megaslim.errors import MegaslimError
    from megaslim.importance.calibrate import check_importance_spec
    from megaslim.importance.scores import ImportanceScores
    from megaslim.model.arch import check_parallel_layout
    from megaslim.model.load import resolve_source, source_arch
    from megaslim.tokenizer import load_tokenizer

    out_dir = Path(cfg.output_dir)
    source = resolve_source(cfg.model.load)
    arch = source_arch(source)
    check_parallel_layout(arch, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    scores = ImportanceScores.load(cfg.importance.scores_path, arch) if cfg.importance.scores_path else None
    rows = None
    if scores is None:
        check_importance_spec(cfg.model.transformer_impl)
        from megaslim.data.calibration import calibration_rows

        tokenizer = load_tokenizer(cfg.model, source)
        rows = calibration_rows(cfg.data.calib_path, tokenizer, num_samples=cfg.importance.num_samples,
                                seq_length=cfg.data.seq_length, dp_rank=0, dp_size=1)
    if not cfg.importance.only:
        raise MegaslimError("pruning is not available yet in this build; run with importance.only=true")

    rt = cli.start(cfg)
    cost = {}
    if scores is None:
        from megaslim.importance.calibrate import compute_importance
        from megaslim.model.load import load_model

        model, arch, _ = load_model(cfg.model, source)
        scores, cost = compute_importance(model, arch, rows, cfg.importance,
                                          micro_batch_size=cfg.data.micro_batch_size,
                                          transformer_impl=cfg.model.transformer_impl)
    if rt.is_rank0:
        from megaslim.importance.plots import plot_importance

        scores.save(out_dir / "importance.safetensors")
        plot_importance(scores, out_dir)
        cli.write_json(out_dir / "importance.json", {"model": source.label, **cost, "settings": scores.settings})
        cli.save_run_config(cfg)
    score_table(scores, cost, out_dir)


if __name__ == "__main__":
    main_guard(main)
