"""Worker: load a model source at TP/PP, run the pipeline forward on given tokens, save full logits.

usage: forward_logits.py SOURCE TP PP TOKENS_PT OUT_PT [EXPORT_DIR]
"""
import sys

import torch

from megaslim.config import ModelConfig
from megaslim.model.forward import run_forward
from megaslim.runtime import init_runtime, main_guard
from megaslim.sources import load_model


def main():
    src, tp, pp, tokens_pt, out_pt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    export_dir = sys.argv[6] if len(sys.argv) > 6 else None
    init_runtime(tp=tp, pp=pp)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model, arch, source = load_model(ModelConfig(load=src))
    tokens = torch.load(tokens_pt)
    b, s = tokens.shape
    batch = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(b, s),
             "position_ids": torch.arange(s).unsqueeze(0).expand(b, -1).contiguous()}
    outs = run_forward(model, [batch], lambda _b, logits: {
        "logits": gather_from_tensor_model_parallel_region(logits)[..., :arch.vocab_size]},
        seq_length=s, micro_batch_size=b)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        torch.save(outs[0]["logits"], out_pt)
    if export_dir:
        from megaslim.model.hf import export_hf

        export_hf(model, arch, export_dir, tokenizer_dir=source.tokenizer_dir, source=src)


if __name__ == "__main__":
    main_guard(main)
