"""The prune command (launch/prune.py): importance -> plan -> prune -> evaluate -> checkpoint/export."""

import json
from pathlib import Path

from megaslim import io as mio
from megaslim import report
from megaslim.commands import cli


def score_table(scores, cost, out_dir):
    import torch

    rows = [
        ("calibration", f"{scores.settings.get('num_samples')} samples x {scores.settings.get('seq_length')} tokens"),
        ("aggregation", f"seq_agg={scores.settings.get('seq_agg')} batch_agg={scores.settings.get('batch_agg')} "
                        f"neuron_signal={scores.settings.get('neuron_signal')}"),
        ("least important layers (BI)", torch.argsort(scores.layer_bi)[:5].tolist()),
    ]
    if scores.layer_loss is not None:
        rows.append(("least important layers (loss)", torch.argsort(scores.layer_loss)[:5].tolist()))
    if cost:
        rows += [("seconds", round(cost["seconds"], 1)), ("tokens/s (activation pass)", round(cost["tokens_per_second"]))]
    rows.append(("outputs", out_dir))
    report.summary_table("megaslim importance", rows)


def plan_table(plan, seq_length):
    from megaslim.prune.plan import flops_per_token

    a, b = plan.source_arch, plan.target_arch
    if not report.is_rank0():
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="prune plan")
    for col in ("", "source", "pruned"):
        t.add_column(col)
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels"):
        t.add_row(key, str(getattr(a, key)), str(getattr(b, key)))
    t.add_row("params", f"{a.num_params():,}", f"{b.num_params():,} ({b.num_params() / a.num_params():.1%})")
    t.add_row(f"GFLOPs/token (seq {seq_length})", f"{flops_per_token(a, seq_length) / 1e9:.3f}",
              f"{flops_per_token(b, seq_length) / 1e9:.3f}")
    dropped = sorted(set(range(a.num_layers)) - set(plan.keep_layers))
    t.add_row("dropped layers", "", str(dropped) if dropped else "-")
    Console().print(t)


def iterate(cfg, model, arch, target, scores, rows, eval_rows, out_dir, is_rank0):
    """prune.iterative > 1: the chain of step plans, re-scoring the partly pruned model before each step."""
    from megaslim.eval import evaluate_rows
    from megaslim.importance.calibrate import compute_importance
    from megaslim.prune.iterative import iterative_plans
    from megaslim.runtime import rank0_print

    steps = []

    def score(m, a, i):
        s, _ = compute_importance(m, a, rows, cfg.importance, micro_batch_size=cfg.data.micro_batch_size,
                                  transformer_impl=cfg.model.transformer_impl)
        if is_rank0:
            s.save(out_dir / f"importance_step{i}.safetensors")
        return s

    def on_step(i, plan, pruned):
        t = plan.target_arch
        row = {"step": i, "params": t.num_params(), **{k: getattr(t, k) for k in (
            "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")}}
        if pruned is not None:
            row["loss"] = evaluate_rows(pruned, eval_rows, vocab_size=arch.vocab_size,
                                        micro_batch_size=cfg.data.micro_batch_size)["loss"]
        steps.append(row)
        rank0_print(f"iterative step {i + 1}/{cfg.prune.iterative}: {row}")

    chain = iterative_plans(model, arch, target, cfg.prune.iterative, score=score, model_cfg=cfg.model,
                            tp=cfg.parallel.tensor_model_parallel_size, first_scores=scores, on_step=on_step,
                            layer_metric=cfg.prune.layer_metric, contiguous=cfg.prune.drop_contiguous,
                            fold_heads=cfg.prune.fold_heads and cfg.prune.fold_mode)
    return chain, steps


def search_candidates(cfg, arch) -> list:
    """prune.target_params: the candidate shapes, checked before any compute (also by compress)."""
    from megaslim.errors import MegaslimError
    from megaslim.prune.search import candidates

    given = [k for k, v in vars(cfg.prune.export_config).items() if v is not None]
    clashes = ([f"prune.export_config.{k}" for k in given] + (["prune.drop_layers"] if cfg.prune.drop_layers else [])
               + (["prune.plan_path"] if cfg.prune.plan_path else [])
               + (["prune.iterative"] if cfg.prune.iterative != 1 else []))
    if clashes:
        raise MegaslimError(f"prune.target_params searches the shape itself; unset {', '.join(clashes)}")
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    ttp = cfg.prune.target_tensor_model_parallel_size or tp
    tpp = cfg.prune.target_pipeline_model_parallel_size or pp
    if pp != 1:
        raise MegaslimError("prune.target_params prunes every candidate in memory and needs "
                            "parallel.pipeline_model_parallel_size=1 (write the result at any PP with "
                            "prune.target_pipeline_model_parallel_size)")
    sp = cfg.prune.sparsity
    return candidates(arch, cfg.prune.target_params, cfg.prune.search, tps=(tp, ttp), pp=tpp,
                      input_multiple=4 if sp.method and sp.pattern == "2:4" else 1)


def _search(cfg, model, arch, shapes, scores, eval_rows, train_prefix, tokenizer, out_dir):
    """Rank the candidates, write search.json, return the best shape."""
    from megaslim.prune.search import rank, table

    ranked = rank(cfg, model, arch, shapes, scores, eval_rows, train_prefix=train_prefix, tokenizer=tokenizer,
                  out_dir=out_dir / "search")
    table(ranked, cfg.prune.target_params, cfg.prune.search.train_iters)
    import torch.distributed as dist

    dist.barrier()
    if report.is_rank0():
        import shutil

        shutil.rmtree(out_dir / "search", ignore_errors=True)  # the candidates' data cache
        mio.write_json(out_dir / "search.json", {
            "target_params": cfg.prune.target_params, "train_iters": cfg.prune.search.train_iters,
            "ranking": [r.to_dict() for r in ranked]})
    return ranked[0].arch


def run(cfg) -> dict:
    """The whole prune command for `cfg`; returns the prune.json record (or the importance record)."""
    from megaslim.errors import MegaslimError
    from megaslim.importance.calibrate import check_importance_spec
    from megaslim.importance.scores import ImportanceScores
    from megaslim.model.arch import check_parallel_layout
    from megaslim.prune.plan import PrunePlan, target_shape
    from megaslim.runtime.distributed import check_layout
    from megaslim.sources import resolve_source, source_arch
    from megaslim.tokenizer import load_tokenizer

    timer = report.Timer()
    out_dir = Path(cfg.output_dir)
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    ttp = cfg.prune.target_tensor_model_parallel_size or tp
    tpp = cfg.prune.target_pipeline_model_parallel_size or pp
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(world, tp, pp)
    check_layout(world, ttp, tpp)
    source = resolve_source(cfg.model.load)
    arch = source_arch(source)
    check_parallel_layout(arch, tp, pp)

    # Everything the run needs is checked and read before any compute.
    plan = None
    if cfg.prune.plan_path:
        plan = PrunePlan.load(cfg.prune.plan_path)
        plan.check_applies_to(arch)
    scores = ImportanceScores.load(cfg.importance.scores_path, arch) if cfg.importance.scores_path else None
    target = shapes = None
    if cfg.prune.target_params is not None and not cfg.importance.only:
        shapes = search_candidates(cfg, arch)
    elif not cfg.importance.only and plan is None:
        target = target_shape(arch, cfg.prune.export_config, tp=ttp, hf_export=cfg.export.hf_dir is not None)
        if cfg.prune.drop_layers and cfg.prune.export_config.num_layers:
            raise MegaslimError("set either prune.drop_layers or prune.export_config.num_layers, not both")
        if len(cfg.prune.drop_layers):
            from dataclasses import replace

            target = replace(target, num_layers=arch.num_layers - len(set(cfg.prune.drop_layers)))
    if cfg.prune.iterative < 1:
        raise MegaslimError(f"prune.iterative={cfg.prune.iterative} must be >= 1 (1 = single shot)")
    if cfg.prune.iterative > 1 and not cfg.importance.only:
        if plan is not None:
            raise MegaslimError("prune.plan_path fixes the plan; it cannot be combined with prune.iterative > 1")
        if len(cfg.prune.drop_layers):
            raise MegaslimError("prune.drop_layers lists the layers explicitly, nothing to re-score: use "
                                "prune.export_config.num_layers with prune.iterative > 1, or iterative=1")
        if pp != 1:
            raise MegaslimError("prune.iterative > 1 re-scores the partly pruned model in memory and needs "
                                "parallel.pipeline_model_parallel_size=1 (the pruned model can still be written "
                                "at any PP: prune.target_pipeline_model_parallel_size)")
        check_parallel_layout(target, tp, 1)  # the intermediate models run at the source TP
    if plan is not None or target is not None:
        check_parallel_layout(plan.target_arch if plan else target, ttp, tpp)
    for shape in shapes or []:
        check_parallel_layout(shape, ttp, tpp)
    from megaslim import checkpoint as ckpt

    ckpt.check_output_dir(out_dir / "checkpoint")
    # sparsity alone (no structured target): an identity plan, no importance pass
    sparsity_only = (cfg.prune.sparsity.method is not None and plan is None and target is not None
                     and target == arch and cfg.prune.iterative == 1)
    needs_scores = scores is None and (cfg.importance.only or plan is None) and not sparsity_only
    iterative = cfg.prune.iterative > 1 and not cfg.importance.only
    tokenizer = load_tokenizer(cfg.model, source)
    rows = eval_rows = None
    if needs_scores or iterative:
        check_importance_spec(cfg.model.transformer_impl)
        from megaslim.data.calibration import calibration_rows

        rows = calibration_rows(cfg.data.calib_path, tokenizer, num_samples=cfg.importance.num_samples,
                                seq_length=cfg.data.seq_length)
    if not cfg.importance.only:
        from megaslim.data.corpora import data_path
        from megaslim.data.packing import pack_rows, read_documents

        path = data_path(cfg.data.eval_path, "data.eval_path")
        eval_rows = pack_rows(read_documents(path), tokenizer, seq_length=cfg.data.seq_length,
                              num_rows=cfg.eval.num_samples, what=f"data.eval_path={path}")
    train_prefix = None
    if shapes and cfg.prune.search.train_iters > 0:
        from megaslim.data.corpora import data_path
        from megaslim.data.indexed import cached_indexed

        train_prefix = cached_indexed(data_path(cfg.data.train_path, "data.train_path"), tokenizer)

    from megaslim.sparsity.apply import prepare_sparsity  # prune.sparsity: checked (wanda's rows read) before compute

    sparsity = prepare_sparsity(cfg, None if cfg.importance.only else plan.target_arch if plan else target,
                                tokenizer=tokenizer)
    rt = cli.start(cfg)
    from megaslim.eval import evaluate_rows
    from megaslim.sources import load_model

    model, arch, _ = load_model(cfg.model, source)
    cost = {}
    if needs_scores:
        from megaslim.importance.calibrate import compute_importance

        scores, cost = compute_importance(model, arch, rows, cfg.importance,
                                          micro_batch_size=cfg.data.micro_batch_size,
                                          transformer_impl=cfg.model.transformer_impl)
        if rt.is_rank0:
            from megaslim.importance.plots import plot_importance

            scores.save(out_dir / "importance.safetensors")
            plot_importance(scores, out_dir)
            mio.write_json(out_dir / "importance.json", {"model": source.label, **cost, "settings": scores.settings})
        score_table(scores, cost, out_dir)
    if rt.is_rank0:
        cli.save_run_config(cfg)
    if cfg.importance.only:
        return {"importance": str(out_dir / "importance.safetensors"), **cost}

    from megaslim.prune.apply import build_pruned, reinit_parallel, write_pruned_stage
    from megaslim.prune.plan import build_plan

    mbs = cfg.data.micro_batch_size
    before = evaluate_rows(model, eval_rows, vocab_size=arch.vocab_size, micro_batch_size=mbs)
    chain, steps = None, []
    if shapes:
        target = _search(cfg, model, arch, shapes, scores, eval_rows, train_prefix, tokenizer, out_dir)
    if plan is None and cfg.prune.iterative > 1:
        chain, steps = iterate(cfg, model, arch, target, scores, rows, eval_rows, out_dir, rt.is_rank0)
        from megaslim.prune.iterative import compose_plans

        plan = compose_plans(chain, drop_folds=True)
    elif plan is None:
        plan = build_plan(arch, target, scores, drop_layers=cfg.prune.drop_layers,
                          layer_metric=cfg.prune.layer_metric, contiguous=cfg.prune.drop_contiguous,
                          fold_heads=cfg.prune.fold_heads and cfg.prune.fold_mode)
    plan_table(plan, cfg.data.seq_length)
    scratch = out_dir / ".pruned_full.partial"
    write_pruned_stage(model, chain or plan, scratch)
    del model
    reinit_parallel(ttp, tpp, cfg.train.seed)
    pruned = build_pruned(plan, scratch, cfg.model)
    sparsity.apply(pruned, plan.target_arch, out_dir, micro_batch_size=mbs)  # no-op without prune.sparsity
    after = evaluate_rows(pruned, eval_rows, vocab_size=arch.vocab_size, micro_batch_size=mbs)
    ckpt.save_checkpoint(pruned, plan.target_arch, out_dir / "checkpoint", 0,
                         tokenizer_dir=cfg.model.tokenizer or source.tokenizer_dir,
                         extra={"pruned_from": source.label, **sparsity.extra()},
                         sharded_extra=sparsity.sharded(pruned))
    hf_dir = None
    if cfg.export.hf_dir:
        from megaslim.model.hf import export_hf

        hf_dir = export_hf(pruned, plan.target_arch, cfg.export.hf_dir,
                           tokenizer_dir=cfg.model.tokenizer or source.tokenizer_dir, source=str(out_dir))
    if rt.is_rank0:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
        plan.save(out_dir / "prune_plan.json")
        if chain:
            mio.write_json(out_dir / "prune_plan_steps.json", [json.loads(p.to_json()) for p in chain])
        for name, res in (("eval_before.json", before), ("eval.json", after)):
            mio.write_json(out_dir / name, res)
    result = {
        "source": source.label, "params_before": arch.num_params(),
        "params_after": plan.target_arch.num_params(), "loss_before": before["loss"],
        "loss_after": after["loss"], "seconds": timer.seconds, "checkpoint": str(out_dir / "checkpoint"),
        "hf_dir": str(hf_dir) if hf_dir else None, "target_tp": ttp, "target_pp": tpp,
        "fold_heads": bool(plan.fold_heads or any(p.fold_heads for p in chain or [])),
        "iterative": cfg.prune.iterative, "steps": steps, "sparsity": sparsity.summary()}
    if rt.is_rank0:
        mio.write_json(out_dir / "prune.json", result)
    report.summary_table("megaslim prune", [
        ("model", source.label),
        ("params", f"{arch.num_params():,} -> {plan.target_arch.num_params():,}"),
        ("held-out loss (ppl)", f"{before['loss']:.4f} ({before['ppl']:.2f}) -> {after['loss']:.4f} ({after['ppl']:.2f})"),
        ("layout", f"TP={tp} PP={pp} -> TP={ttp} PP={tpp}"),
        ("seconds", round(timer.seconds, 1)),
        ("checkpoint", out_dir / "checkpoint"), ("hf_dir", hf_dir or "-"),
    ])
    return result
