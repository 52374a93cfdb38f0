"""Write `model.load` (HF dir, .gguf or torch_dist checkpoint) as a Hugging Face directory.

torchrun --nproc-per-node N launch/export_hf.py --config CONFIG export.hf_dir=OUT [key.sub=value ...]
The result loads with transformers.AutoModelForCausalLM.from_pretrained(OUT).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaslim import report  # noqa: E402
from megaslim.commands import cli  # noqa: E402
from megaslim.runtime import main_guard  # noqa: E402


def main():
    cfg = cli.parse_args(__doc__)
    from megaslim.errors import MegaslimError
    from megaslim.model.arch import check_parallel_layout
    from megaslim.model.hf import check_output_dir
    from megaslim.sources import resolve_source, source_arch

    timer = report.Timer()
    out = Path(cfg.export.hf_dir or Path(cfg.output_dir) / "hf")
    check_output_dir(out)
    source = resolve_source(cfg.model.load)
    arch = source_arch(source)
    check_parallel_layout(arch, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    if source.tokenizer_dir is None and cfg.model.tokenizer is None:
        raise MegaslimError(f"{source.label} carries no tokenizer; set model.tokenizer")

    cli.start(cfg)
    from megaslim.model.hf import export_hf
    from megaslim.sources import load_model

    model, arch, _ = load_model(cfg.model, source)
    export_hf(model, arch, out, tokenizer_dir=cfg.model.tokenizer or source.tokenizer_dir, source=source.label)
    report.summary_table("megaslim export_hf", [
        ("model", source.label), ("params", arch.num_params()),
        ("shape", f"{arch.num_layers} layers, hidden {arch.hidden_size}, ffn {arch.ffn_hidden_size}, "
                  f"heads {arch.num_attention_heads}/{arch.num_query_groups} groups"),
        ("seconds", round(timer.seconds, 1)), ("hf_dir", out),
    ])


if __name__ == "__main__":
    main_guard(main)
