"""Synthetic data: the teacher continues prompts drawn from the corpus into a JSONL corpus
({"text", "prompt", "completion", ...} per line) for plain-LM training of the student.

torchrun --nproc-per-node N launch/generate.py --config CONFIG [key.sub=value ...] \
    [generate.num_prompts=64] [generate.prompt_length=32] [generate.max_new_tokens=64] \
    [generate.temperature=0.8] [generate.top_p=0.95] [generate.batch_size=8] [generate.seed=S] \
    [generate.prompts_path=FILE] [generate.output=FILE] [generate.kv_cache=true]
The teacher is distill.teacher.load (or model.load); prompts are windows of data.train_path (or the
documents of generate.prompts_path). TP and DP are supported, PP must be 1. Outputs: the JSONL
(default <output_dir>/synthetic.jsonl, written atomically) and <output_dir>/generate.json. Then train
the student on it with plain LM loss:
    launch/distill.py ... data.train_path=<output_dir>/synthetic.jsonl distill.kd_loss_scale=0 \
        distill.skip_lm_loss=false distill.student.load=STUDENT
"""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from megaslim import config, report
from megaslim import io as mio
from megaslim.commands import cli
from megaslim.config import Config, GenerateConfig
from megaslim.data.corpora import data_path
from megaslim.data.indexed import cached_indexed
from megaslim.distill.generate import (
    batch_generator,
    draw_prompts,
    generate_batch,
    make_batches,
    prompts_from_file,
    to_record,
    write_jsonl,
)
from megaslim.errors import MegaslimError
from megaslim.model.arch import check_parallel_layout
from megaslim.runtime import ParallelLayout
from megaslim.sources import load_model, resolve_source, source_arch
from megaslim.tokenizer import load_tokenizer

SUMMARY = "generate.json"
DEFAULT_OUTPUT = "synthetic.jsonl"


def validate(cfg: Config) -> dict:
    """Every check and the prompt set, before distributed work."""
    s = cfg.generate
    config.validate(cfg)  # load_config ran it; configs built in code need it too
    config.validate_generate(cfg)
    config.check_output_dir_writable(cfg.output_dir)  # generate.json
    if s.output:
        config.check_output_file_writable(s.output, "generate.output")
    layout = ParallelLayout.from_config(cfg)
    src = resolve_source(cfg.distill.teacher.load or cfg.model.load,
                         "distill.teacher.load" if cfg.distill.teacher.load else "model.load")
    arch = source_arch(src)
    check_parallel_layout(arch, layout.tp, layout.pp)
    tokenizer = load_tokenizer(cfg.model, src)
    seed = cfg.train.seed if s.seed is None else s.seed
    prompts, prompt_source = _prompts(cfg, s, tokenizer, seed)
    longest = max(len(p) for p in prompts) + s.max_new_tokens
    if longest > arch.max_position_embeddings:
        raise MegaslimError(f"prompt ({longest - s.max_new_tokens} tokens) + generate.max_new_tokens="
                            f"{s.max_new_tokens} exceeds the teacher's max_position_embeddings="
                            f"{arch.max_position_embeddings}")
    output = Path(s.output) if s.output else Path(cfg.output_dir) / DEFAULT_OUTPUT
    if output.exists() and output.is_dir():
        raise MegaslimError(f"generate.output={output} is a directory")
    return dict(source=src, arch=arch, tokenizer=tokenizer, prompts=prompts, prompt_source=prompt_source,
                seed=seed, output=output, layout=layout)


def _prompts(cfg: Config, s: GenerateConfig, tokenizer, seed: int) -> tuple[list[list[int]], str]:
    """(prompts, where they come from): generate.prompts_path's documents, else corpus windows."""
    if s.prompts_path:
        return prompts_from_file(s.prompts_path, tokenizer, num_prompts=s.num_prompts), str(s.prompts_path)
    source = str(data_path(cfg.data.train_path, "data.train_path"))
    prefix = cached_indexed(source, tokenizer)
    return draw_prompts(prefix, num_prompts=s.num_prompts, prompt_length=s.prompt_length, seed=seed), source


def generate_mine(model, arch, p: dict, s: GenerateConfig) -> tuple[dict[int, list[int]], float]:
    """This DP rank's batches (every DP-th one): {prompt index: new tokens}, and the generation seconds."""
    model.eval()
    layout, prompts = p["layout"], p["prompts"]
    eos = p["tokenizer"].eos_token_id if s.stop_at_eos else None
    mine = layout.shard_rows(list(enumerate(make_batches(prompts, s.batch_size))))
    device = next(model.parameters()).device
    results: dict[int, list[int]] = {}
    t0 = time.time()
    bar = tqdm(total=len(prompts), desc="generate", unit=" prompts", disable=not layout.is_writer(),
               dynamic_ncols=True)
    for j, idx in mine:
        batch = torch.tensor([prompts[i] for i in idx], dtype=torch.long)
        outs = generate_batch(model, batch, vocab_size=arch.vocab_size, max_new_tokens=s.max_new_tokens,
                              temperature=s.temperature, top_p=s.top_p,
                              generator=batch_generator(p["seed"], j, device), eos_id=eos, kv_cache=s.kv_cache)
        results.update(zip(idx, outs))
        bar.update(len(idx) * layout.dp)  # the other DP ranks progress alike
    bar.close()
    return results, time.time() - t0


def write_outputs(cfg: Config, p: dict, results: dict, gen_seconds: float, timer: report.Timer) -> dict:
    """Gather every DP rank's continuations; the writer rank writes the JSONL and generate.json."""
    s, tok, prompts = cfg.generate, p["tokenizer"], p["prompts"]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results if ParallelLayout.tp_rank() == 0 else None)
    summary: dict = {}
    if p["layout"].is_writer():
        merged: dict[int, list[int]] = {}
        for g in gathered:
            merged.update(g or {})
        eos = tok.eos_token_id if s.stop_at_eos else None
        records = [to_record(tok, prompts[i], merged[i], eos) for i in range(len(prompts))]
        write_jsonl(p["output"], records)
        new_tokens = sum(len(merged[i]) for i in range(len(prompts)))
        summary = {
            "output": str(p["output"]), "num_prompts": len(prompts), "prompt_source": p["prompt_source"],
            "teacher": str(p["source"].label), "generated_tokens": new_tokens,
            "finished": sum(r["finished"] for r in records), "seconds": round(timer.seconds, 2),
            "tokens_per_s": new_tokens / max(gen_seconds, 1e-9), "seed": p["seed"], "settings": asdict(s),
        }
        mio.write_json(Path(cfg.output_dir) / SUMMARY, summary)
    dist.barrier()
    return summary


def show(cfg: Config, p: dict, arch, summary: dict, timer: report.Timer) -> None:
    s = cfg.generate
    report.summary_table("megaslim generate", [
        ("teacher", f"{p['source'].label} ({arch.num_params():,} params)"),
        ("prompts", f"{len(p['prompts'])} from {p['prompt_source']}"),
        ("sampling", f"temperature={s.temperature} top_p={s.top_p} max_new_tokens={s.max_new_tokens} "
                     f"kv_cache={s.kv_cache}"),
        ("generated tokens", summary.get("generated_tokens", "-")),
        ("tokens/s", round(summary["tokens_per_s"], 1) if summary else "-"),
        ("seconds", round(timer.seconds, 1)), ("output", p["output"]),
    ])


def run(cfg: Config) -> dict:
    """Generate, write <output>.jsonl and generate.json; returns the summary (empty off the writer rank)."""
    timer = report.Timer()
    p = validate(cfg)
    cli.start(cfg)
    model, arch, _ = load_model(replace(cfg.model, load=None), p["source"])
    results, gen_seconds = generate_mine(model, arch, p, cfg.generate)
    summary = write_outputs(cfg, p, results, gen_seconds, timer)
    show(cfg, p, arch, summary, timer)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run(cli.parse_args(__doc__, argv))
