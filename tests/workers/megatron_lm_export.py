"""Worker: load SOURCE at TP/PP and write it as a Megatron-LM checkpoint (megaslim.megatron_lm's export).

usage: megatron_lm_export.py SOURCE OUT TP PP ITERATION
"""
import sys

from megaslim.config import ModelConfig
from megaslim.runtime import init_runtime, main_guard


def main():
    src, out, tp, pp, it = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    init_runtime(tp=tp, pp=pp)
    from megaslim.megatron_lm import export_megatron_lm
    from megaslim.sources import load_model

    model, arch, source = load_model(ModelConfig(load=src))
    export_megatron_lm(model, arch, out, iteration=it, tokenizer_dir=source.tokenizer_dir)


if __name__ == "__main__":
    main_guard(main)
