"""Benchmark: which experts to drop from a small mixture of experts, by prune.expert_metric (reap, l2,
frequency) against random choices, on a Mixtral made from the embedded default (SmolLM2-135M).

python bench/moe_experts.py [--train-rows 16] [--calib-rows 8] [--eval-rows 16] [--seq 128] [--keep 2] [--seeds 3]
The MoE: each of SmolLM2's 30 MLPs split into 4 experts of 384 of its neurons (a random partition, as
LLaMA-MoE / MoEfication build experts from a dense FFN; each expert's down projection scaled by experts /
top-k so two experts at equal weight add up like the dense neurons they hold), top-2 routing, attention,
norms and the tied embedding copied. Mixtral has no dense layers among MoE layers (megaslim refuses them by
name), so every layer is an MoE layer. Split experts rather than perturbed full copies: on 2 shared cores a
top-2 MoE of full copies (about 215M active parameters) costs 2.3 times the forward of this one (94M), and
split experts differ by construction. Routers (random, std 0.02) are then fitted by layer-local
distillation from the dense model: on --train-rows rows of the default corpus's train split (never used
for calibration), Adam on the relative squared error between the MoE layer's output and the dense MLP's,
experts and everything else frozen, no load-balancing loss. Importance: megaslim's activation_scores on
--calib-rows other rows of that split (reap, l2 and frequency from one pass); pruning: build_plan +
prune_in_memory to --keep experts per layer; held-out loss: the license texts of /usr/share/common-licenses
(legal English, another kind of text than the Shakespeare + Bible corpus), per row through megaslim's
forward and loss (the evaluate_rows protocol), paired against the unpruned MoE. Writes docs/bench_moe.md
(raw results in --work/results.json; the built MoE is reused from --work/moe when there).
"""
import argparse
import itertools
import json
import math
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
LICENSES = ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "LGPL-3", "Artistic", "GPL-2", "LGPL-2.1")
METRICS = ("reap", "l2", "frequency")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N layers (smoke runs)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--train-rows", type=int, default=16, help="rows the routers are fitted on")
    ap.add_argument("--router-steps", type=int, default=200, help="full-batch Adam steps per layer")
    ap.add_argument("--router-lr", type=float, default=1e-2)
    ap.add_argument("--calib-rows", type=int, default=8)
    ap.add_argument("--eval-rows", type=int, default=16)
    ap.add_argument("--keep", default="2", help="experts kept per layer (comma-separated)")
    ap.add_argument("--seeds", type=int, default=3, help="random expert choices per --keep value")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense SmolLM2's held-out loss")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the router fit (2 made it 20x slower on an oversubscribed machine); "
                    "megaslim's init_runtime then sets its own count for importance and evaluation")
    ap.add_argument("--work", default="/tmp/moe-bench/run", help="the built MoE and raw results")
    ap.add_argument("--render", nargs="*", help="only render --work/results.json, plus the runs of these other "
                    "results files (same model and rows, e.g. another --keep), into --out")
    ap.add_argument("--summary", nargs="*", default=[],
                    help="results files of other MoEs (other --seed) for an across-MoEs section")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_moe.md"))
    return ap.parse_args(argv)


# -- the MoE (transformers) ---------------------------------------------------------------------------
def mixtral_config(dense_cfg, args):
    from transformers import MixtralConfig

    c = dense_cfg
    return MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size // args.experts,
        num_hidden_layers=args.layers or c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=True, num_local_experts=args.experts,
        num_experts_per_tok=args.topk, router_aux_loss_coef=0.0, router_jitter_noise=0.0, sliding_window=None,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)


def split_moe(dense, args) -> tuple[object, list[torch.Tensor]]:
    """(Mixtral whose layer l's expert e is the dense MLP's neurons parts[l][e], a random split into
    args.experts equal parts, down projection scaled by experts / top-k; the parts)."""
    from transformers import MixtralForCausalLM

    moe = MixtralForCausalLM(mixtral_config(dense.config, args)).float()
    missing, _ = moe.load_state_dict({k: v for k, v in dense.state_dict().items() if ".mlp." not in k}, strict=False)
    left = [k for k in missing if ".mlp." not in k and "lm_head" not in k]
    assert not left, f"weights not copied from the dense model: {left}"
    g, parts = torch.Generator().manual_seed(args.seed), []
    with torch.no_grad():
        for layer, src in zip(moe.model.layers, dense.model.layers):
            f = src.mlp.gate_proj.weight.shape[0]
            part = torch.randperm(f, generator=g).reshape(args.experts, -1).sort(-1).values
            for e, idx in enumerate(part):
                layer.mlp.experts.gate_up_proj[e] = torch.cat([src.mlp.gate_proj.weight[idx],
                                                               src.mlp.up_proj.weight[idx]], 0)
                layer.mlp.experts.down_proj[e] = src.mlp.down_proj.weight[:, idx] * (args.experts / args.topk)
            layer.mlp.gate.weight.normal_(0.0, 0.02, generator=g)
            parts.append(part)
    return moe, parts


def capture(dense, rows: torch.Tensor, mbs: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(MLP input [T, hidden], neuron activations [T, ffn])] of every dense layer on `rows`."""
    out = [([], []) for _ in dense.model.layers]
    hooks = []
    for i, layer in enumerate(dense.model.layers):
        hooks.append(layer.mlp.register_forward_pre_hook(lambda m, a, i=i: out[i][0].append(a[0].flatten(0, 1))))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, i=i: out[i][1].append(a[0].flatten(0, 1))))
    try:
        with torch.no_grad():
            for b in range(0, len(rows), mbs):
                dense(input_ids=rows[b: b + mbs, :-1])
    finally:
        for h in hooks:
            h.remove()
    return [(torch.cat(x), torch.cat(h)) for x, h in out]


def route(w: torch.Tensor, x: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's routing: softmax over all experts, top-k, renormalised -> (weights [T, k], experts [T, k])."""
    top, idx = torch.topk(torch.softmax(x @ w.T, -1), topk, -1)
    return top / top.sum(-1, keepdim=True), idx


def train_router(w0: torch.Tensor, x, outs, target, args) -> tuple[torch.Tensor, float, float]:
    """Router of one layer fitted so the MoE output matches the dense MLP's (relative squared error, Adam on
    the full batch; the experts frozen); (router, error before, error after). The error of routing weights v
    is v'Gv - 2v'b + |y|^2 with G, b the experts' output Gram matrix and products with y, precomputed."""
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=args.router_lr)
    gram, prod = outs @ outs.transpose(1, 2), (outs @ target[:, :, None])[..., 0]  # [T, E, E], [T, E]
    yy = target.pow(2).sum(-1)
    scale = args.experts / args.topk

    def error():
        weights, idx = route(w, x, args.topk)
        v = torch.zeros_like(prod).scatter(1, idx, weights) * scale
        return ((v[:, None, :] @ gram @ v[:, :, None])[:, 0, 0] - 2 * (v * prod).sum(-1) + yy).mean() / yy.mean()

    first = error().item()
    for _ in range(args.router_steps):
        loss = error()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach(), first, error().item()


def fit_routers(moe, dense, parts, rows: torch.Tensor, args) -> dict:
    """Layer-local distillation of every router from the dense model (its MLP inputs and outputs on `rows`)."""
    t0, log = time.time(), {"before": [], "after": [], "output_cos": []}
    for layer, src, part, (x, h) in zip(moe.model.layers, dense.model.layers, parts,
                                        capture(dense, rows, args.micro_batch)):
        down = src.mlp.down_proj.weight.detach()
        outs = torch.stack([h[:, idx] @ down[:, idx].T for idx in part], 1)  # [T, E, hidden], unscaled
        w, before, after = train_router(layer.mlp.gate.weight.detach(), x, outs, h @ down.T, args)
        with torch.no_grad():
            layer.mlp.gate.weight.copy_(w)
        n = F.normalize(outs.double(), dim=-1)
        pairs = list(itertools.combinations(range(outs.shape[1]), 2))
        log["output_cos"].append(sum((n[:, a] * n[:, b]).sum(-1).mean().item() for a, b in pairs) / len(pairs))
        log["before"].append(before)
        log["after"].append(after)
    log["seconds"] = time.time() - t0
    print(json.dumps({k: v if k == "seconds" else [round(a, 3) for a in v] for k, v in log.items()}), flush=True)
    return log


def expert_cosines(moe) -> dict:
    """Pairwise cosine of the experts' flattened weights (gate, up, down), over every layer and pair."""
    vals = []
    for layer in moe.model.layers:
        ex = layer.mlp.experts
        flat = F.normalize(torch.cat([ex.gate_up_proj.detach().flatten(1), ex.down_proj.detach().flatten(1)],
                                     1).double(), dim=1)
        cos = flat @ flat.T
        vals += [cos[a, b].item() for a, b in itertools.combinations(range(flat.shape[0]), 2)]
    t = torch.tensor(vals)
    return {"mean": t.mean().item(), "min": t.min().item(), "max": t.max().item()}


def build_and_train(args, work: Path, train_rows: torch.Tensor) -> dict:
    """Build the MoE, fit its routers and save it under work/moe (reused when present); its build record."""
    from transformers import AutoModelForCausalLM

    from megaslim.io import atomic_write_text
    from megaslim.sources import default_model_dir

    rec_path, out = work / "build.json", work / "moe"
    if (out / "config.json").is_file() and rec_path.is_file():
        return json.loads(rec_path.read_text())
    dense = AutoModelForCausalLM.from_pretrained(str(default_model_dir()), dtype=torch.float32).eval()
    if args.layers:
        dense.model.layers = dense.model.layers[: args.layers]
        dense.config.num_hidden_layers = args.layers
    moe, parts = split_moe(dense, args)
    rec = {"weight_cos": expert_cosines(moe), "router_fit": fit_routers(moe, dense, parts, train_rows, args)}
    moe.save_pretrained(str(out), safe_serialization=True)
    atomic_write_text(rec_path, json.dumps(rec))
    return rec


# -- megaslim: importance, pruning, held-out loss ----------------------------------------------------
def license_rows(tokenizer, seq_length: int, n: int) -> torch.Tensor:
    from megaslim.data.packing import pack_rows

    docs = [Path("/usr/share/common-licenses", name).read_text() for name in LICENSES]
    return pack_rows(docs, tokenizer, seq_length=seq_length, num_rows=n, what="license texts")


def row_losses(model, rows: torch.Tensor, vocab_size: int, mbs: int) -> list[float]:
    """Mean token loss of each row (megaslim.eval.evaluate_rows' forward and loss, kept per row)."""
    from megaslim.model.forward import make_microbatches, run_forward
    from megaslim.model.logits import vocab_parallel_ce

    def on_output(batch, logits):
        mask = batch["loss_mask"]
        loss = vocab_parallel_ce(logits, batch["labels"], vocab_size).double() * mask
        return {"sum": loss.sum(-1), "count": mask.sum(-1).double()}

    with torch.no_grad():
        outs = run_forward(model, make_microbatches(rows, mbs), on_output, seq_length=rows.shape[1] - 1,
                           micro_batch_size=mbs)
    s, c = (torch.cat([o[k].cpu() for o in outs]) for k in ("sum", "count"))
    return (s / c.clamp_min(1))[: len(rows)].tolist()


def variants(scores, keeps: list[int], seeds: int) -> list[tuple[str, int, object, str]]:
    """(name, kept experts, scores, expert_metric) of every pruned model measured."""
    out = []
    shape = scores.expert_reap.shape
    for k in keeps:
        out += [(m, k, scores, m) for m in METRICS]
        for s in range(seeds):
            g = torch.Generator().manual_seed(1000 + s)
            out.append((f"random#{s}", k, replace(scores, expert_reap=torch.rand(shape, generator=g)), "reap"))
    return out


def routing_stats(scores, arch) -> dict:
    """Routing entropy (bits; log2(E) = uniform) of the calibration tokens' expert shares, and router weights."""
    p = scores.expert_frequency.double() / arch.moe_router_topk  # [L, E], rows sum to 1
    ent = -(p * p.clamp_min(1e-12).log2()).sum(-1)
    w = scores.expert_weight.double()
    return {"entropy_bits": ent.mean().item(), "entropy_min": ent.min().item(), "max_bits": math.log2(p.shape[1]),
            "max_share": p.max().item(), "min_share": p.min().item(), "weight_min": w.min().item(),
            "weight_max": w.max().item()}


def load_rows(args):
    """(tokenizer, router-fitting rows, calibration rows, held-out rows): disjoint rows of the train split."""
    from megaslim.config import load_config
    from megaslim.data.calibration import calibration_rows
    from megaslim.sources import resolve_source
    from megaslim.tokenizer import load_tokenizer

    tok = load_tokenizer(load_config(None, []).model, resolve_source(None))
    rows = calibration_rows(None, tok, num_samples=args.calib_rows + args.train_rows, seq_length=args.seq)
    return tok, rows[args.calib_rows:], rows[: args.calib_rows], license_rows(tok, args.seq, args.eval_rows)


def prune_and_eval(model, arch, cfg, scores, held, args) -> list[dict]:
    """Every variant pruned in memory and evaluated (a kept set already measured is not run twice)."""
    from megaslim.config.schema import ExportConfigShape
    from megaslim.prune.apply import prune_in_memory
    from megaslim.prune.plan import build_plan, target_shape

    runs, seen = [], {}
    for name, k, sc, metric in variants(scores, [int(x) for x in args.keep.split(",")], args.seeds):
        target = target_shape(arch, ExportConfigShape(num_moe_experts=k), tp=1, hf_export=False)
        plan = build_plan(arch, target, sc, expert_metric=metric)
        kept = [plan.keep_experts[layer] for layer in plan.keep_layers]
        key = json.dumps(kept)
        t0 = time.time()
        if key not in seen:
            pruned = prune_in_memory(model, plan, cfg.model)
            seen[key] = row_losses(pruned, held, arch.vocab_size, args.micro_batch)
            del pruned
        runs.append({"method": name, "keep": k, "kept": kept, "losses": seen[key], "seconds": time.time() - t0})
        print(name, k, round(sum(seen[key]) / len(held), 4), f"{time.time() - t0:.0f}s", flush=True)
    return runs


def measure(args) -> dict:
    from megaslim.config import ImportanceConfig, load_config
    from megaslim.importance.calibrate import activation_scores
    from megaslim.importance.scores import ImportanceScores
    from megaslim.runtime import init_runtime
    from megaslim.sources import load_model, resolve_source

    t_start, work = time.time(), Path(args.work)
    tok, train, calib, held = load_rows(args)
    res = {"build": build_and_train(args, work, train)}
    cfg = load_config(None, [f"model.load={work / 'moe'}", "model.transformer_impl=local"])
    init_runtime()
    if not args.no_dense:  # the dense model on the same rows: how far the MoE is from it
        dense, d_arch, _ = load_model(cfg.model, resolve_source(None))
        res["dense"] = row_losses(dense, held, d_arch.vocab_size, args.micro_batch)
        del dense
        print("dense:", sum(res["dense"]) / len(held), flush=True)
    model, arch, _ = load_model(cfg.model, resolve_source(str(work / "moe")))
    t0 = time.time()
    scores = ImportanceScores(**activation_scores(model, arch, calib, ImportanceConfig(),
                                                  micro_batch_size=args.micro_batch))
    res["score_seconds"] = time.time() - t0
    res["routing"] = routing_stats(scores, arch)
    res["scores"] = {m: getattr(scores, f"expert_{m}").tolist() for m in (*METRICS, "weight")}
    res["base"] = row_losses(model, held, arch.vocab_size, args.micro_batch)
    print("unpruned:", sum(res["base"]) / len(held), json.dumps(res["routing"]), flush=True)
    res["runs"] = prune_and_eval(model, arch, cfg, scores, held, args)
    res["settings"] = {k: v for k, v in vars(args).items() if k not in ("render", "out")}
    res["settings"]["threads_fit"] = args.threads
    res["settings"].update(host=platform.node(), threads=torch.get_num_threads(), seconds=time.time() - t_start)
    return res


# -- the table -----------------------------------------------------------------------------------------
def _paired(values: list[float], ref: list[float]) -> tuple[float, float, float]:
    d = torch.tensor(values, dtype=torch.float64) - torch.tensor(ref, dtype=torch.float64)
    se = d.std(unbiased=True).item() / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return sum(values) / len(values), d.mean().item(), se


def _same(a: dict, b: dict) -> int:
    return sum(x == y for x, y in zip(a["kept"], b["kept"]))


def table_lines(res: dict) -> list[str]:
    base = res["base"]
    L = len(res["build"]["router_fit"]["after"])
    lines = ["| experts kept | method | held-out loss (paired diff. to unpruned ± s.e.) | layers keeping the same "
             "experts as reap |", "|---|---|---|---|"]
    if res.get("dense"):
        m, d, se = _paired(res["dense"], base)
        lines.append(f"| dense SmolLM2 | - | {m:.3f} ({d:+.3f} ± {se:.3f}) | - |")
    lines.append(f"| {res['settings']['experts']} (unpruned) | - | {sum(base) / len(base):.3f} | - |")
    for k in sorted({r["keep"] for r in res["runs"]}):
        runs = [r for r in res["runs"] if r["keep"] == k]
        reap = next(r for r in runs if r["method"] == "reap")
        for r in runs:
            m, d, se = _paired(r["losses"], base)
            lines.append(f"| {k} | {r['method']} | {m:.3f} ({d:+.3f} ± {se:.3f}) | {_same(r, reap)}/{L} |")
        rand = [r for r in runs if r["method"].startswith("random")]
        if rand:
            mean_losses = [sum(v) / len(rand) for v in zip(*(r["losses"] for r in rand))]
            m, d, se = _paired(mean_losses, base)
            lines.append(f"| {k} | random (mean of {len(rand)}) | {m:.3f} ({d:+.3f} ± {se:.3f}) | - |")
    return lines


def versus_lines(res: dict) -> list[str]:
    """Each metric against the mean of the random choices and against reap, paired over rows."""
    out = []
    for k in sorted({r["keep"] for r in res["runs"]}):
        runs = {r["method"]: r for r in res["runs"] if r["keep"] == k}
        rand = [r["losses"] for n, r in runs.items() if n.startswith("random")]
        ref = [sum(v) / len(rand) for v in zip(*rand)] if rand else None
        for m in METRICS:
            if ref is not None:
                _, d, se = _paired(runs[m]["losses"], ref)
                out.append(f"- keep {k}, {m} - random (mean): {d:+.3f} ± {se:.3f}")
        for m in METRICS[1:]:
            _, d, se = _paired(runs[m]["losses"], runs["reap"]["losses"])
            out.append(f"- keep {k}, {m} - reap: {d:+.3f} ± {se:.3f}")
    return out


def _vs_random(res: dict, k: int) -> dict[str, tuple[float, float]]:
    """{metric: (paired mean difference to the random choices' mean, its s.e.)} at `k` experts kept."""
    runs = {r["method"]: r for r in res["runs"] if r["keep"] == k}
    rand = [r["losses"] for n, r in runs.items() if n.startswith("random")]
    ref = [sum(v) / len(rand) for v in zip(*rand)]
    return {m: _paired(runs[m]["losses"], ref)[1:] for m in METRICS}


def summary_lines(results: list[dict]) -> list[str]:
    """One row per MoE (--seed): each metric's loss minus the random choices' mean, paired over rows; then
    the mean over the MoEs that ran that column (its s.e. from the per-MoE ones, as independent)."""
    keeps = sorted({r["keep"] for res in results for r in res["runs"]})
    head = [f"keep {k}: {m}" for k in keeps for m in METRICS]
    lines = ["| MoE (--seed) | unpruned | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    cols = [[] for _ in head]
    for res in results:
        have = {r["keep"] for r in res["runs"]}
        row = [v for k in keeps for v in (_vs_random(res, k).values() if k in have else [None] * len(METRICS))]
        for c, v in zip(cols, row):
            if v is not None:
                c.append(v)
        lines.append(f"| {res['settings']['seed']} | {sum(res['base']) / len(res['base']):.3f} | "
                     + " | ".join("-" if v is None else f"{v[0]:+.3f} ± {v[1]:.3f}" for v in row) + " |")
    pooled = [f"{sum(d for d, _ in c) / len(c):+.3f} ± {math.sqrt(sum(se ** 2 for _, se in c)) / len(c):.3f} "
              f"({len(c)})" for c in cols]
    lines.append("| mean (MoEs) | - | " + " | ".join(pooled) + " |")
    return lines


def render(res: dict, others: tuple = ()) -> str:
    s, b, r = res["settings"], res["build"], res["routing"]
    fit = b["router_fit"]
    cmd = (f"python bench/moe_experts.py --train-rows {s['train_rows']} --calib-rows {s['calib_rows']} "
           f"--eval-rows {s['eval_rows']} --seq {s['seq']} --keep {s['keep']} --seeds {s['seeds']}"
           + (f" --seed {s['seed']}" if s.get("seed") else "") + (" --no-dense" if s.get("no_dense") else "")
           + (f" --layers {s['layers']}" if s.get("layers") else ""))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    lines = [
        "# Expert pruning on a SmolLM2 MoE: reap vs l2 vs frequency vs random (bench/moe_experts.py)", "",
        f"Command: `{cmd}`" + (" (runs of other --keep values merged in with --render)" if
                               {str(q["keep"]) for q in res["runs"]} != set(s["keep"].split(",")) else ""), "",
        f"Model: SmolLM2-135M-Instruct (embedded default) with each of its {len(fit['after'])} MLPs split into "
        f"{s['experts']} experts (a random partition of its neurons), top-{s['topk']}, as a Mixtral checkpoint. "
        f"Routers fitted layer by layer to the dense MLP's output ({s['train_rows']} x {s['seq']} tokens of the "
        f"default train split, {s['router_steps']} Adam steps, lr {s['router_lr']}): relative squared error "
        f"{mean(fit['before']):.3f} (random routers) -> {mean(fit['after']):.3f} on average over layers, "
        f"{fit['seconds']:.0f} s. Importance: {s['calib_rows']} x {s['seq']} calibration rows (other rows of "
        f"the same split), {res['score_seconds']:.0f} s. Held-out: {s['eval_rows']} x {s['seq']} rows of the "
        "license texts of /usr/share/common-licenses; mean token loss, in brackets the paired difference to the "
        "unpruned MoE ± its standard error over rows. Lower is better.", "",
        *table_lines(res), "", "Paired over the same rows:", "", *versus_lines(res), "",
        "How alike the experts are:", "",
        f"- pairwise cosine of the experts' flattened weights: mean {b['weight_cos']['mean']:.3f} (min "
        f"{b['weight_cos']['min']:.3f}, max {b['weight_cos']['max']:.3f}); of their outputs on the router-fitting "
        f"tokens: mean {mean(fit['output_cos']):.3f} over layers (min {min(fit['output_cos']):.3f}, max "
        f"{max(fit['output_cos']):.3f})",
        f"- routing entropy of the calibration tokens' expert shares: {r['entropy_bits']:.3f} bits of "
        f"{r['max_bits']:.0f} (uniform) on average over layers, lowest {r['entropy_min']:.3f}; expert shares "
        f"{r['min_share']:.3f}..{r['max_share']:.3f}; mean router weight when routed "
        f"{r['weight_min']:.3f}..{r['weight_max']:.3f} (top-{s['topk']} renormalised: {1 / s['topk']:.2f} = "
        "no preference)", "",
        *(["## Across MoEs (other random neuron splits and router inits)", "",
            "Held-out loss of each metric minus the mean of the random choices (paired over rows ± s.e.; "
            "negative = better than random):", "", *summary_lines([res, *others]), ""] if others else []),
        f"Machine: {s['host']}, shared with other jobs; router fit on {s.get('threads_fit', 1)} thread(s), "
        f"megaslim on {s['threads']}; whole run {s['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv=None):
    from megaslim.io import atomic_write_text

    args = parse_args(argv)
    raw = Path(args.work) / "results.json"
    if args.render is not None:
        res = json.loads(raw.read_text())
        for extra in args.render:
            res["runs"] += [r for r in json.loads(Path(extra).read_text())["runs"] if r["keep"] not in
                            {q["keep"] for q in res["runs"]}]
    else:
        torch.manual_seed(args.seed)
        torch.set_num_threads(args.threads)
        res = measure(args)
        atomic_write_text(raw, json.dumps(res))
    others = [json.loads(Path(p).read_text()) for p in args.summary]
    atomic_write_text(Path(args.out), render(res, others))
    print(render(res, others))


if __name__ == "__main__":
    main()
