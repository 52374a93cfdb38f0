"""Write `model.load` (HF dir, .gguf or torch_dist checkpoint) as a Hugging Face directory.

torchrun --nproc-per-node N launch/export_hf.py --config CONFIG export.hf_dir=OUT [key.sub=value ...]
The result loads with transformers.AutoModelForCausalLM.from_pretrained(OUT).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from megaslim import report
from megaslim.commands import cli
from megaslim.config import Config, check_output_dir_writable
from megaslim.errors import MegaslimError
from megaslim.model.arch import check_parallel_layout
from megaslim.model.hf import check_output_dir, export_hf
from megaslim.runtime import ParallelLayout
from megaslim.sources import load_model, resolve_source, source_arch


def validate(cfg: Config) -> dict:
    """Output folder, source, layout and tokenizer, before any process group exists."""
    out = Path(cfg.export.hf_dir or Path(cfg.output_dir) / "hf")
    check_output_dir_writable(out, "export.hf_dir" if cfg.export.hf_dir else "output_dir")
    check_output_dir(out)
    source = resolve_source(cfg.model.load)
    arch = source_arch(source)
    # The model's fit before the world size: its message names the TP sizes that fit the model.
    check_parallel_layout(arch, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    layout = ParallelLayout.from_config(cfg)
    if source.tokenizer_dir is None and cfg.model.tokenizer is None:
        raise MegaslimError(f"{source.label} carries no tokenizer; set model.tokenizer")
    return dict(out=out, source=source, layout=layout)


def run(cfg: Config) -> dict:
    """Load the model at the configured layout and write it as an HF directory; returns what was written."""
    timer = report.Timer()
    p = validate(cfg)
    cli.start(cfg)
    source, out = p["source"], p["out"]
    model, arch, _ = load_model(cfg.model, source)
    export_hf(model, arch, out, tokenizer_dir=cfg.model.tokenizer or source.tokenizer_dir, source=source.label)
    report.summary_table("megaslim export_hf", [
        ("model", source.label), ("params", arch.num_params()),
        ("shape", f"{arch.num_layers} layers, hidden {arch.hidden_size}, ffn {arch.ffn_hidden_size}, "
                  f"heads {arch.num_attention_heads}/{arch.num_query_groups} groups"),
        ("seconds", round(timer.seconds, 1)), ("hf_dir", out),
    ])
    return {"model": source.label, "params": arch.num_params(), "hf_dir": str(out),
            "seconds": round(timer.seconds, 2)}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run(cli.parse_args(__doc__, argv))
