"""Worker: load a model source at TP/PP (and EP for a mixture of experts), run the pipeline forward on given
tokens, save the full logits; optionally export it back to HF and save it as a torch_dist checkpoint.

usage: forward_logits.py SOURCE TP PP TOKENS_PT OUT_PT [EXPORT_DIR|-] [--ep N] [--save CKPT_ROOT]
"""
import sys

import torch

from megaslim.config import ModelConfig
from megaslim.model.forward import run_forward
from megaslim.runtime import init_runtime, main_guard
from megaslim.sources import load_model


def _flag(name, default=None):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def main():
    src, tp, pp, tokens_pt, out_pt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    export_dir = sys.argv[6] if len(sys.argv) > 6 and not sys.argv[6].startswith("-") else None
    ep, save_root = int(_flag("--ep", 1)), _flag("--save")
    init_runtime(tp=tp, pp=pp, ep=ep)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model, arch, source = load_model(ModelConfig(load=src))
    if arch.is_moe:  # whole experts split over the EP ranks
        local = model.decoder.layers[0].mlp.experts.local_experts
        assert len(local) == arch.num_moe_experts // ep, len(local)
    tokens = torch.load(tokens_pt)
    b, s = tokens.shape
    batch = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(b, s),
             "position_ids": torch.arange(s).unsqueeze(0).expand(b, -1).contiguous()}
    outs = run_forward(model, [batch], lambda _b, logits: {
        "logits": gather_from_tensor_model_parallel_region(logits)[..., :arch.vocab_size]},
        seq_length=s, micro_batch_size=b)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        torch.save(outs[0]["logits"], out_pt)
    if export_dir:
        from megaslim.model.hf import export_hf

        export_hf(model, arch, export_dir, tokenizer_dir=source.tokenizer_dir, source=src)
    if save_root:
        from megaslim.checkpoint import save_checkpoint

        save_checkpoint(model, arch, save_root, 1, tokenizer_dir=source.tokenizer_dir)


if __name__ == "__main__":
    main_guard(main)
