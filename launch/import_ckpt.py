"""Write any supported model source (HF dir, .gguf, megaslim checkpoint) as a megatron torch_dist
checkpoint (iteration 0) at the configured TP/PP:

    torchrun --nproc-per-node N launch/import_ckpt.py [--config X.yaml] model.load=SRC output_dir=OUT \
        parallel.tensor_model_parallel_size=T parallel.pipeline_model_parallel_size=P
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from megaslim.commands.cli import Timer, parse_args, save_run_config, start, summary_table, write_json  # noqa: E402
from megaslim.runtime.distributed import main_guard  # noqa: E402

RESULT = "import_ckpt.json"


def main() -> None:
    cfg = parse_args("Import a model (HF dir | .gguf | checkpoint) as a megatron torch_dist checkpoint")
    from megaslim import checkpoint
    from megaslim.errors import MegaslimError
    from megaslim.model.arch import check_parallel_layout
    from megaslim.sources import load_model, resolve_source, source_arch

    out = Path(cfg.output_dir)
    checkpoint.check_output_dir(out)
    source = resolve_source(cfg.model.load)
    arch = source_arch(source)
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    check_parallel_layout(arch, tp, pp)
    if cfg.model.tokenizer is not None and not Path(cfg.model.tokenizer).is_dir():
        raise MegaslimError(f"model.tokenizer={cfg.model.tokenizer}: no such directory")
    tokenizer = cfg.model.tokenizer or source.tokenizer_dir

    rt = start(cfg)
    timer = Timer()
    model, arch, source = load_model(cfg.model, source)
    path = checkpoint.save_checkpoint(
        model, arch, out, 0, tokenizer_dir=tokenizer,
        extra={"tool": "import_ckpt", "source": source.label, "source_kind": source.kind})
    seconds = timer.seconds
    tok_dir = checkpoint.read_meta(path)["tokenizer_dir"]
    result = {
        "source": source.label,
        "source_kind": source.kind,
        "params": arch.num_params(),
        "tensor_model_parallel_size": rt.tp,
        "pipeline_model_parallel_size": rt.pp,
        "checkpoint": str(path),
        "tokenizer_dir": tok_dir,
        "seconds": seconds,
        "arch": arch.to_dict(),
    }
    if rt.is_rank0:
        # Written after the checkpoint, so a failed import never leaves foreign files in output_dir.
        save_run_config(cfg)
        write_json(out / RESULT, result)
    summary_table("import_ckpt", [
        ("source", f"{source.label} ({source.kind})"),
        ("params", arch.num_params()),
        ("TP / PP", f"{rt.tp} / {rt.pp}"),
        ("checkpoint", path),
        ("tokenizer", tok_dir or "none (set model.tokenizer to include one)"),
        ("result", out / RESULT),
        ("seconds (load + save)", round(seconds, 2)),
    ])


if __name__ == "__main__":
    main_guard(main)
