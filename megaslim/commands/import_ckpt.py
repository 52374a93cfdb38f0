"""Write any supported model source (HF dir, .gguf, megaslim checkpoint) as a megatron torch_dist
checkpoint (iteration 0) at the configured TP/PP:

    torchrun --nproc-per-node N launch/import_ckpt.py [--config X.yaml] model.load=SRC output_dir=OUT \
        parallel.tensor_model_parallel_size=T parallel.pipeline_model_parallel_size=P
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from megaslim import checkpoint, report
from megaslim import io as mio
from megaslim.commands import cli
from megaslim.config import Config, check_output_dir_writable
from megaslim.errors import MegaslimError
from megaslim.model.arch import check_parallel_layout
from megaslim.runtime import ParallelLayout
from megaslim.sources import load_model, resolve_source, source_arch

DESCRIPTION = "Import a model (HF dir | .gguf | checkpoint) as a megatron torch_dist checkpoint"
RESULT = "import_ckpt.json"


def validate(cfg: Config) -> dict:
    """Output folder, source, layout and tokenizer, before any process group exists."""
    out = Path(cfg.output_dir)
    check_output_dir_writable(out)
    checkpoint.check_output_dir(out)
    source = resolve_source(cfg.model.load)
    arch = source_arch(source)
    # The model's fit before the world size: its message names the TP sizes that fit the model.
    check_parallel_layout(arch, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    layout = ParallelLayout.from_config(cfg)
    if cfg.model.tokenizer is not None and not Path(cfg.model.tokenizer).is_dir():
        raise MegaslimError(f"model.tokenizer={cfg.model.tokenizer}: no such directory")
    return dict(out=out, source=source, layout=layout, tokenizer=cfg.model.tokenizer or source.tokenizer_dir)


def convert(cfg: Config, p: dict) -> dict:
    """Load the source at the configured layout and save it as iteration 0; returns import_ckpt.json."""
    cli.start(cfg)
    timer = report.Timer()
    model, arch, source = load_model(cfg.model, p["source"])
    path = checkpoint.save_checkpoint(
        model, arch, p["out"], 0, tokenizer_dir=p["tokenizer"],
        extra={"tool": "import_ckpt", "source": source.label, "source_kind": source.kind})
    seconds = timer.seconds
    return {
        "source": source.label,
        "source_kind": source.kind,
        "params": arch.num_params(),
        "tensor_model_parallel_size": p["layout"].tp,
        "pipeline_model_parallel_size": p["layout"].pp,
        "checkpoint": str(path),
        "tokenizer_dir": checkpoint.read_meta(path)["tokenizer_dir"],
        "seconds": seconds,
        "arch": arch.to_dict(),
    }


def run(cfg: Config) -> dict:
    p = validate(cfg)
    result = convert(cfg, p)
    out = p["out"]
    if p["layout"].is_writer():
        # Written after the checkpoint, so a failed import never leaves foreign files in output_dir.
        cli.save_run_config(cfg)
        mio.write_json(out / RESULT, result)
    report.summary_table("import_ckpt", [
        ("source", f"{result['source']} ({result['source_kind']})"),
        ("params", result["params"]),
        ("TP / PP", f"{result['tensor_model_parallel_size']} / {result['pipeline_model_parallel_size']}"),
        ("checkpoint", result["checkpoint"]),
        ("tokenizer", result["tokenizer_dir"] or "none (set model.tokenizer to include one)"),
        ("result", out / RESULT),
        ("seconds (load + save)", round(result["seconds"], 2)),
    ])
    return result


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run(cli.parse_args(DESCRIPTION, argv))
