"""Write any supported model source (HF dir, .gguf, megaslim checkpoint) as a megatron torch_dist
checkpoint (iteration 0) at the configured TP/PP:

    torchrun --nproc-per-node N launch/import_ckpt.py [--config X.yaml] model.load=SRC output_dir=OUT \
        parallel.tensor_model_parallel_size=T parallel.pipeline_model_parallel_size=P
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from megaslim.commands import cli, import_ckpt  # noqa: E402
from megaslim.runtime import main_guard  # noqa: E402

if __name__ == "__main__":  # --check: the checks before compute only (no process group, no weights)
    main_guard(lambda: cli.main_or_check(import_ckpt.main, import_ckpt.validate, sys.argv[1:]))
