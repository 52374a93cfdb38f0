"""Compress a model the Minitron way: rounds of importance -> prune -> distill -> HF export.

torchrun --nproc-per-node N launch/compress.py --config CONFIG [key.sub=value ...]
Targets: compress.rounds (a list of shapes) or prune.export_config (one round). Outputs in
<output_dir>: round<N>/{prune,distill,hf}/, compress.json, family.png. A rerun skips finished stages.

python launch/compress.py --config CONFIG --dry-run [--nodes N] [--gpus-per-node G] [--gpu-memory-gib M]
    [--gpu-tflops T] [--mfu U] [--overhead-gib O] [--hf-config PATH] [--json FILE] [key.sub=value ...]
plans the run without GPU, weights or torch.distributed (megaslim/commands/plan.py): parameters, FLOPs/token,
memory per GPU and time per stage; exits 2 with the reason when the layout does not divide or fit.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaslim.commands import cli, compress, plan  # noqa: E402
from megaslim.runtime import main_guard  # noqa: E402


def main():
    # --check: the checks before compute only (no process group, no weights)
    cli.main_or_check(compress.main, compress.check, sys.argv[1:])


if __name__ == "__main__":
    if plan.wants_dry_run(sys.argv[1:]):
        plan.main(sys.argv[1:])  # no process group: its own one-line errors, no distributed teardown
    else:
        main_guard(main)
