"""Write `model.load` (HF dir, .gguf or torch_dist checkpoint) as a Hugging Face directory.

torchrun --nproc-per-node N launch/export_hf.py --config CONFIG export.hf_dir=OUT [key.sub=value ...]
The result loads with transformers.AutoModelForCausalLM.from_pretrained(OUT).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from megaslim.commands import cli, export_hf  # noqa: E402
from megaslim.runtime import main_guard  # noqa: E402

if __name__ == "__main__":  # --check: the checks before compute only (no process group, no weights)
    main_guard(lambda: cli.main_or_check(export_hf.main, export_hf.validate, sys.argv[1:]))
