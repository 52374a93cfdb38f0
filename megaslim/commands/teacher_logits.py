"""Offline teacher logits: run the teacher once over the samples a distillation run will read and
store its top-k log-probs (k = distill.top_k), so distillation can run without the teacher.

torchrun --nproc-per-node N launch/teacher_logits.py --config CONFIG [key.sub=value ...] \
    [offline.dtype=float32|float16|bfloat16] [offline.samples_per_shard=256]
The teacher is distill.teacher.load (or model.load); the samples are those of data.train_path with
data.seq_length, train.train_iters x train.global_batch_size and train.seed -- use the same values in
the distillation run. Outputs in <output_dir>: teacher_logits.json (index, written last), shards/
(safetensors), tokenizer/; output_dir must be visible to every rank (shared filesystem on multi-node
jobs). Any TP/PP/DP may compute them and any TP/PP/DP may distill from them. Then distill with
    launch/distill.py ... distill.teacher.load=<output_dir> distill.kl=topk distill.student.load=STUDENT
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from megaslim import config, report
from megaslim.commands import cli
from megaslim.config import Config
from megaslim.data.corpora import data_path
from megaslim.data.heldout import heldout_rows
from megaslim.data.indexed import cached_indexed
from megaslim.data.loaders import gpt_dataset, micro_batches
from megaslim.distill.offline import (
    INDEX,
    ShardWriter,
    begin_store,
    data_identity,
    finish_store,
    is_offline_dir,
    partial_shards,
    sample_ids,
    teacher_identity,
    topk_logprobs,
)
from megaslim.errors import MegaslimError
from megaslim.eval import evaluate_rows
from megaslim.model.arch import check_parallel_layout
from megaslim.model.forward import run_forward
from megaslim.runtime import ParallelLayout
from megaslim.sources import check_positions, load_model, resolve_source, source_arch
from megaslim.tokenizer import load_tokenizer


def validate(cfg: Config) -> dict:
    """Every check before distributed work: layout, steps, teacher, k, output directory, data."""
    config.validate(cfg)  # load_config ran it; configs built in code need it too
    config.check_output_dir_writable(cfg.output_dir)
    layout = ParallelLayout.from_config(cfg)
    t = cfg.train
    layout.check_global_batch(t.global_batch_size, t.micro_batch_size)
    load = cfg.distill.teacher.load or cfg.model.load
    if is_offline_dir(load):
        raise MegaslimError(f"{load} already holds offline logits; name the teacher model with "
                            "distill.teacher.load or model.load")
    src = resolve_source(load, "distill.teacher.load" if cfg.distill.teacher.load else "model.load")
    arch = source_arch(src)
    check_parallel_layout(arch, layout.tp, layout.pp)
    check_positions(arch, cfg.data.seq_length, "the teacher")
    k = cfg.distill.top_k
    if k > arch.vocab_size:  # k >= 1 is the config's
        raise MegaslimError(f"distill.top_k={k} must be in [1, vocab_size={arch.vocab_size}]")
    tokenizer = load_tokenizer(cfg.model, src)
    out = Path(cfg.output_dir)
    if (out / INDEX).exists():
        raise MegaslimError(f"{out} already holds offline logits; choose another output_dir")
    prefix = cached_indexed(data_path(cfg.data.train_path, "data.train_path"), tokenizer)
    eval_rows = heldout_rows(cfg.data.eval_path, tokenizer, seq_length=cfg.data.seq_length,
                             num_samples=cfg.eval.num_samples)
    return dict(source=src, arch=arch, tokenizer=tokenizer, prefix=prefix, layout=layout, out=out,
                eval_path=data_path(cfg.data.eval_path, "data.eval_path"), eval_rows=eval_rows,
                identity=teacher_identity(src, arch, tokenizer), data=data_identity(prefix))


def build(cfg: Config, p: dict):
    """Process groups, the teacher, an empty shards folder and this rank's writer (None: not a writer)."""
    from megatron.core import parallel_state as ps  # lazy: config checks must not pay for megatron

    cli.start(cfg)
    model, arch, _ = load_model(replace(cfg.model, load=None), p["source"])
    if p["layout"].is_writer():
        begin_store(p["out"])
    dist.barrier()
    writer = None
    # One writer per DP rank: the TP rank 0 of the last stage, which holds the logits.
    if ps.is_pipeline_last_stage() and p["layout"].tp_rank() == 0:
        writer = ShardWriter(partial_shards(p["out"]), tag=f"{p['layout'].dp_rank():03d}",
                             dtype=cfg.offline.dtype, samples_per_shard=cfg.offline.samples_per_shard)
    return model, arch, writer


def _batches(cfg: Config, p: dict) -> Iterator[dict]:
    """This DP rank's micro-batches of the distillation samples, each with its global `sample_ids`."""
    t, layout = cfg.train, p["layout"]
    total = t.train_iters * t.global_batch_size
    ds = gpt_dataset(p["prefix"], p["tokenizer"], seq_length=cfg.data.seq_length, num_samples=total, seed=t.seed,
                     cache_path=p["out"] / "data_cache")
    batches = micro_batches(ds, micro_batch_size=t.micro_batch_size, dp_rank=layout.dp_rank(), dp_size=layout.dp,
                            num_samples=total)
    ids = sample_ids(micro_batch_size=t.micro_batch_size, dp_rank=layout.dp_rank(), dp_size=layout.dp,
                     consumed_samples=0, num_samples=total)
    for mb, mb_ids in zip(batches, ids):
        mb["sample_ids"] = torch.tensor(mb_ids, dtype=torch.long)
        yield mb


def compute(cfg: Config, p: dict, model, arch, writer: Optional[ShardWriter]) -> dict:
    """The teacher over every step's samples, top-k written by the writers; then its held-out result."""
    t, seq, k = cfg.train, cfg.data.seq_length, cfg.distill.top_k
    per_step = p["layout"].check_global_batch(t.global_batch_size, t.micro_batch_size)

    def on_output(batch, logits):
        idx, logp = topk_logprobs(logits, vocab_size=arch.vocab_size, k=k)
        if writer is not None:
            text = torch.cat([batch["tokens"], batch["labels"][:, -1:]], dim=1)
            writer.add(sample_ids=batch["sample_ids"], text=text, topk_idx=idx, topk_logp=logp)
        return {}

    batches = _batches(cfg, p)
    bar = tqdm(total=t.train_iters, desc="teacher top-k", disable=not p["layout"].is_writer(), dynamic_ncols=True)
    for _ in range(t.train_iters):
        chunk = [next(batches) for _ in range(per_step)]
        run_forward(model, chunk, on_output, seq_length=seq, micro_batch_size=t.micro_batch_size)
        bar.update(1)
    bar.close()
    if writer is not None:
        writer.flush()
    return evaluate_rows(model, p["eval_rows"], vocab_size=arch.vocab_size, micro_batch_size=cfg.data.micro_batch_size)


def write_index(cfg: Config, p: dict, writer: Optional[ShardWriter], teacher_eval: dict,
                timer: report.Timer) -> dict:
    """Collect every writer's shard table; the writer rank finishes the store (index last)."""
    t, seq, layout = cfg.train, cfg.data.seq_length, p["layout"]
    total = t.train_iters * t.global_batch_size
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (writer.records, writer.bytes) if writer is not None else None)
    index: dict = {}
    if layout.is_writer():
        written = sum(g[1] for g in gathered if g is not None)
        index = finish_store(p["out"], p["tokenizer"], {
            "teacher": p["identity"],
            "data": {**p["data"], "seed": t.seed, "seq_length": seq, "dataset_num_samples": total},
            "top_k": cfg.distill.top_k, "dtype": cfg.offline.dtype, "num_samples": total,
            "shards": [r for g in gathered if g is not None for r in g[0]],
            "teacher_eval": {"loss": teacher_eval["loss"], "eval_path": str(p["eval_path"]),
                             "num_samples": cfg.eval.num_samples, "seq_length": seq},
            "stats": {"seconds": round(timer.seconds, 2), "bytes": written, "tokens": total * seq,
                      "bytes_per_token": written / (total * seq)},
            "created_with": {"tensor_model_parallel_size": layout.tp, "pipeline_model_parallel_size": layout.pp,
                             "world_size": layout.world_size},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }, num_samples=total)
    dist.barrier()
    return index


def show(cfg: Config, p: dict, arch, teacher_eval: dict, index: dict, timer: report.Timer) -> None:
    t = cfg.train
    report.summary_table("megaslim teacher_logits", [
        ("teacher", f"{p['source'].label} ({arch.num_params():,} params)"),
        ("samples x tokens", f"{t.train_iters * t.global_batch_size} x {cfg.data.seq_length}"),
        ("top-k / dtype", f"{cfg.distill.top_k} / {cfg.offline.dtype}"),
        ("teacher held-out loss", teacher_eval["loss"]),
        ("stored bytes / token", round(index["stats"]["bytes_per_token"], 1) if index else "-"),
        ("seconds", round(timer.seconds, 1)), ("outputs", p["out"]),
    ])


def run(cfg: Config) -> dict:
    """Run the teacher over exactly the samples `train.train_iters` distillation steps would read and
    write its top-k log-probs (k = distill.top_k) as a store in `output_dir`; returns the index
    (empty off the writer rank)."""
    timer = report.Timer()
    p = validate(cfg)
    model, arch, writer = build(cfg, p)
    teacher_eval = compute(cfg, p, model, arch, writer)
    index = write_index(cfg, p, writer, teacher_eval, timer)
    show(cfg, p, arch, teacher_eval, index, timer)
    return index


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run(cli.parse_args(__doc__, argv))
