"""Worker: load a model source at TP/PP with model.core_attention=local and =sdpa, run the pipeline
forward on given tokens, save both full logits as {"local": ..., "sdpa": ...}.

usage: sdpa_logits.py SOURCE TP PP TOKENS_PT OUT_PT
"""
import sys

import torch

from megaslim.config import ModelConfig
from megaslim.model.forward import run_forward
from megaslim.runtime import init_runtime, main_guard
from megaslim.sources import load_model


def logits(src: str, core_attention: str, tokens: torch.Tensor):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model, arch, _ = load_model(ModelConfig(load=src, core_attention=core_attention))
    b, s = tokens.shape
    batch = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(b, s),
             "position_ids": torch.arange(s).unsqueeze(0).expand(b, -1).contiguous()}
    outs = run_forward(model, [batch], lambda _b, lg: {
        "logits": gather_from_tensor_model_parallel_region(lg)[..., :arch.vocab_size]},
        seq_length=s, micro_batch_size=b)
    return outs[0]["logits"] if outs else None


def main():
    src, tp, pp, tokens_pt, out_pt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    init_runtime(tp=tp, pp=pp)
    from megatron.core import parallel_state as ps

    tokens = torch.load(tokens_pt)
    res = {kind: logits(src, kind, tokens) for kind in ("local", "sdpa")}
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        torch.save(res, out_pt)


if __name__ == "__main__":
    main_guard(main)
