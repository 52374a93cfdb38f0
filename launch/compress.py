"""Compress a model the Minitron way: rounds of importance -> prune -> distill -> HF export.

torchrun --nproc-per-node N launch/compress.py --config CONFIG [key.sub=value ...]
Targets: compress.rounds (a list of shapes) or prune.export_config (one round). Outputs in
<output_dir>: round<N>/{prune,distill,hf}/, compress.json, family.png. A rerun skips finished stages.

python launch/compress.py --config CONFIG --dry-run [--nodes N] [--gpus-per-node G] [--gpu-memory-gib M]
    [--gpu-tflops T] [--mfu U] [--overhead-gib O] [--hf-config PATH] [--json FILE] [key.sub=value ...]
plans the run without GPU, weights or torch.distributed (megaslim/planner.py): parameters, FLOPs/token,
memory per GPU and time per stage; exits 2 with the reason when the layout does not divide or fit.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaslim.commands import cli  # noqa: E402
from megaslim.runtime import main_guard  # noqa: E402

_PLANNER_FLAGS = ("--nodes", "--gpus-per-node", "--gpu-memory-gib", "--gpu-tflops", "--mfu", "--overhead-gib",
                  "--hf-config", "--json")


def _planner_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--config")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    p.add_argument("--gpu-tflops", type=float, default=989.0, help="peak per GPU (989: H100 SXM dense bf16)")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--overhead-gib", type=float, default=4.0)
    p.add_argument("--hf-config", help="HF config.json (or its directory) to read shapes from")
    p.add_argument("--json", help="also write the plan as JSON to this file")
    return p


def dry_run(args: argparse.Namespace, rest: list[str]) -> None:
    from megaslim import planner

    cfg = cli.parse_args(__doc__, (["--config", args.config] if args.config else []) + rest)
    opts = planner.PlannerOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                  gpu_memory_gib=args.gpu_memory_gib, gpu_tflops=args.gpu_tflops, mfu=args.mfu,
                                  overhead_gib=args.overhead_gib, hf_config=args.hf_config)
    planner.dry_run(cfg, opts, config_path=args.config, json_path=args.json)


def main():
    argv = sys.argv[1:]
    given = [f for f in _PLANNER_FLAGS if any(a == f or a.startswith(f + "=") for a in argv)]
    if given:
        from megaslim.errors import MegaslimError

        raise MegaslimError(f"{', '.join(given)}: planner options, they only work with --dry-run")
    from megaslim.compress import run

    run(cli.parse_args(__doc__, argv))


def dry_run_main(args: argparse.Namespace, rest: list[str]) -> None:
    """The dry run touches no torch.distributed or megatron state: user errors exit 2 with one line, as
    main_guard does, without its distributed teardown."""
    from megaslim.errors import MegaslimError

    try:
        dry_run(args, rest)
    except MegaslimError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    _args, _rest = _planner_parser().parse_known_args(sys.argv[1:])
    if _args.dry_run:
        dry_run_main(_args, _rest)
    else:
        main_guard(main)
