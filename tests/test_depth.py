"""Joint depth pruning (block_loss, greedy_loss): cached-state candidates against really pruned models,
brute-force block choice, greedy's bound, plans rebuilt from saved scores, TP/DP independence, config checks."""
import itertools
from dataclasses import replace

import pytest
import torch
from dist_utils import ROOT, torchrun

from megaslim.config import ConfigError, ImportanceConfig, ModelConfig, load_config
from megaslim.errors import MegaslimError
from megaslim.eval import evaluate_rows
from megaslim.importance.calibrate import compute_importance
from megaslim.importance.depth import (
    LayerRunner,
    _batches,
    block_loss_scores,
    block_spans,
    candidate_losses,
    greedy_cost,
    greedy_loss_order,
    greedy_rounds,
    span_cost,
)
from megaslim.importance.scores import ImportanceScores
from megaslim.prune.apply import prune_in_memory
from megaslim.prune.depth import best_blocks, check_depth_request
from megaslim.prune.plan import PrunePlan, build_plan
from megaslim.sources import load_model

MBS = 2


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
    """A tiny random Llama with 6 layers (more than one block start per size); vocab 256 needs no padding,
    so the logits reach the loss unmasked (a transposed view)."""
    from tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("deep") / "llama", layers=6, seed=5, vocab=256)


@pytest.fixture(scope="module")
def deep(deep_llama, megatron_tp1):
    model, arch, _ = load_model(ModelConfig(load=str(deep_llama)))
    torch.manual_seed(0)
    return model, arch, torch.randint(0, 250, (5, 17))  # 5 rows: the last micro-batch is padded


def _pruned_loss(model, arch, rows, dropped):
    plan = build_plan(arch, replace(arch, num_layers=arch.num_layers - len(dropped)), None, drop_layers=dropped)
    pruned = prune_in_memory(model, plan, ModelConfig())
    return evaluate_rows(pruned, rows, vocab_size=arch.vocab_size, micro_batch_size=MBS)["loss"]


def test_cached_candidate_loss_is_the_pruned_models_loss(deep):
    model, arch, rows = deep
    runner, batches, active = LayerRunner(model, arch.vocab_size), _batches(rows, MBS), list(range(arch.num_layers))
    spans = [(1, 3), (0, 1), (5, 6), (2, 5)]
    losses, base = candidate_losses(runner, batches, active, spans)
    assert abs(base - evaluate_rows(model, rows, vocab_size=arch.vocab_size, micro_batch_size=MBS)["loss"]) < 1e-5
    for (p, q), got in zip(spans, losses.tolist()):
        assert abs(got - _pruned_loss(model, arch, rows, list(range(p, q)))) < 1e-5, (p, q)
    # a partly pruned "current model" (greedy's later rounds): layers 1 and 4 already gone, then remove 3
    active = [0, 2, 3, 5]
    losses, _ = candidate_losses(runner, batches, active, [(2, 3)])
    assert abs(losses.item() - _pruned_loss(model, arch, rows, [1, 3, 4])) < 1e-5


def test_block_loss_picks_the_best_block_by_brute_force(deep):
    model, arch, rows = deep
    L, k = arch.num_layers, 2
    scan = block_loss_scores(model, arch, rows, drop=k, micro_batch_size=MBS)
    assert scan.shape == (k, L) and torch.isnan(scan[0]).all() and torch.isinf(scan[1, L - 1])
    base = evaluate_rows(model, rows, vocab_size=arch.vocab_size, micro_batch_size=MBS)["loss"]
    brute = [_pruned_loss(model, arch, rows, list(range(i, i + k))) - base for i in range(L - k + 1)]
    assert torch.allclose(scan[1, :L - 1], torch.tensor(brute, dtype=torch.float64), atol=1e-5)
    best = min(range(len(brute)), key=lambda i: brute[i])
    assert best_blocks(scan, k, 1) == [(best, k)]
    scores = ImportanceScores(torch.zeros(L, 8), torch.zeros(L, 4), torch.zeros(L, 128), torch.zeros(64),
                              torch.zeros(L), layer_block_loss=scan, settings={"block_drop": k, "layer_blocks": 1})
    plan = build_plan(arch, replace(arch, num_layers=L - k), scores, layer_metric="block_loss")
    assert plan.keep_layers == [i for i in range(L) if not best <= i < best + k]


def test_best_blocks_is_the_cheapest_set_of_blocks():
    g = torch.Generator().manual_seed(3)
    L, k = 9, 4
    scores = torch.rand(k, L, generator=g, dtype=torch.float64)
    for s in range(1, k + 1):
        scores[s - 1, L - s + 1:] = float("inf")
    for blocks in (1, 2, 3):
        brute = []
        for n in range(1, blocks + 1):
            for sizes in itertools.product(range(1, k + 1), repeat=n):
                if sum(sizes) != k:
                    continue
                for starts in itertools.combinations(range(L), n):
                    ends = [a + s for a, s in zip(starts, sizes)]
                    if ends[-1] > L or any(ends[j] >= starts[j + 1] for j in range(n - 1)):
                        continue  # past the end, or touching/overlapping blocks
                    brute.append(sum(scores[s - 1, a].item() for a, s in zip(starts, sizes)))
        got = best_blocks(scores, k, blocks)
        assert sum(s for _, s in got) == k and len(got) <= blocks
        assert abs(sum(scores[s - 1, a].item() for a, s in got) - min(brute)) < 1e-12


def test_greedy_respects_its_bound(deep, monkeypatch):
    model, arch, rows = deep
    assert greedy_rounds(15) == [3, 3, 3, 3, 3] and greedy_rounds(7) == [2, 2, 1, 1, 1] and greedy_rounds(2) == [1, 1]
    calls = []
    monkeypatch.setattr(LayerRunner, "layer", lambda self, i, h, kw: calls.append(i) or self.layers[i](
        hidden_states=h, **kw)[0])
    order, records = greedy_loss_order(model, arch, rows, drop=3, micro_batch_size=MBS, max_rounds=2)
    rounds = greedy_rounds(3, 2)
    assert [len(r["removed"]) for r in records] == rounds == [2, 1]
    n_batches = 3  # 5 rows, micro-batches of 2
    assert len(calls) == greedy_cost(arch.num_layers, rounds)[0] * n_batches
    assert int(torch.isfinite(order).sum()) == 3
    # round 1 removes the two cheapest single layers of the full model
    single = block_loss_scores(model, arch, rows, drop=1, micro_batch_size=MBS)[0]
    assert sorted(records[0]["removed"]) == sorted(torch.argsort(single, stable=True)[:2].tolist())


def _count_calls(model):
    """Counters of finished decoder-layer forwards (a pre-hook also sees the cache pass stopped at layer 0),
    embedding and output-head calls, and the hook handles."""
    counts = {"layers": 0, "embedding": 0, "head": 0}

    def counter(key):
        return lambda *a: counts.__setitem__(key, counts[key] + 1)

    handles = [layer.register_forward_hook(counter("layers")) for layer in model.decoder.layers]
    handles += [model.embedding.register_forward_hook(counter("embedding")),
                model.output_layer.register_forward_hook(counter("head"))]
    return counts, handles


@pytest.mark.parametrize("k, blocks", [(1, 1), (2, 1), (4, 1), (2, 2)])
def test_block_scan_costs_about_half_L_squared_layer_forwards(deep, k, blocks):
    """Real layer forward calls of a block scan: the cache (L) plus the layers after each block, i.e.
    L + (L-k)(L-k+1)/2 for one block size (about L^2/2 for small k), half the candidates' layer forwards
    of full passes (the output head and embedding: once per candidate and once per micro-batch)."""
    model, arch, rows = deep
    L, n_batches = arch.num_layers, 3  # 5 rows in micro-batches of 2
    counts, handles = _count_calls(model)
    try:
        block_loss_scores(model, arch, rows, drop=k, blocks=blocks, micro_batch_size=MBS)
    finally:
        for h in handles:
            h.remove()
    sizes = [k] if blocks == 1 else range(1, k + 1)
    per_batch = L + sum((L - s) * (L - s + 1) // 2 for s in sizes)
    candidates = sum(L - s + 1 for s in sizes)
    assert counts == {"layers": per_batch * n_batches, "embedding": n_batches, "head": (candidates + 1) * n_batches}
    assert per_batch == span_cost(L, block_spans(L, k, blocks))
    full = L + sum((L - s + 1) * (L - s) for s in sizes)  # full passes: baseline + each candidate's layers
    assert per_batch - L == (full - L) // 2  # the candidates cost half the layer forwards of full passes
    if k == 1:  # the single-layer scan: about L^2 / 2
        assert per_batch == L + L * (L - 1) // 2
    assert span_cost(30, block_spans(30, 15, 1)) == 30 + 15 * 16 // 2  # SmolLM2 30 -> 15: 150 (docs/pruning.md)


def test_block_plots_are_written(deep, tmp_path):
    """The block scan under the BI bars (one block size) and the sizes x starts heatmap (all sizes)."""
    from megaslim.importance.plots import plot_importance

    model, arch, rows = deep
    for blocks in (1, 2):
        scores, _ = compute_importance(model, arch, rows, ImportanceConfig(), micro_batch_size=MBS,
                                       transformer_impl="local", depth_metric="block_loss", layer_drop=2,
                                       layer_blocks=blocks)
        out = tmp_path / f"b{blocks}"
        names = {p.name for p in plot_importance(scores, out)}
        assert "importance_layers.png" in names and ("importance_blocks.png" in names) == (blocks > 1)
        assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temporary files left
        assert all((out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    scores.layer_greedy = torch.tensor([float("inf"), 0, 2, float("inf"), 1, float("inf")])  # its own panel
    assert (tmp_path / "g" / "importance_layers.png") in plot_importance(scores, tmp_path / "g")


def test_prune_validate_refuses_more_blocks_than_layers_to_drop(deep_llama, tmp_path):
    """The source's layer count is read from its config: layer_blocks > k stops the prune command's
    validation (launch/prune.py --check), before data, model or process group."""
    from megaslim.commands import prune as prune_cmd

    base = [f"model.load={deep_llama}", f"output_dir={tmp_path / 'o'}", "prune.layer_metric=block_loss",
            "model.transformer_impl=local", "data.seq_length=16"]
    cfg = load_config(None, base + ["prune.export_config.num_layers=4", "prune.layer_blocks=3"])
    with pytest.raises(MegaslimError, match="prune.layer_blocks=3 is more blocks than the 2 layers to drop"):
        prune_cmd.validate(cfg)
    cfg = load_config(None, base + ["prune.export_config.num_layers=6"])
    with pytest.raises(MegaslimError, match="needs layers to drop"):
        prune_cmd.validate(cfg)


def test_distill_validate_refuses_more_blocks_than_layers_to_drop(tiny_llama_tok, tmp_path):
    """distill prunes its default student from the teacher: the same joint-depth check, in its validation."""
    from megaslim.commands import distill as distill_cmd

    cfg = load_config(None, [f"model.load={tiny_llama_tok}", f"output_dir={tmp_path / 'o'}", "data.seq_length=16",
                             "prune.layer_metric=block_loss", "prune.export_config.num_layers=2",
                             "prune.layer_blocks=3", "model.transformer_impl=local"])
    with pytest.raises(MegaslimError, match="prune.layer_blocks=3 is more blocks than the 2 layers to drop"):
        distill_cmd.validate(cfg)


def test_saved_scores_rebuild_the_same_plan(deep, tmp_path):
    model, arch, rows = deep
    target = replace(arch, num_layers=3)
    saved = {}
    for metric, blocks in (("block_loss", 1), ("block_loss", 2), ("greedy_loss", 1)):
        scores, _ = compute_importance(model, arch, rows, ImportanceConfig(), micro_batch_size=MBS,
                                       transformer_impl="local", depth_metric=metric, layer_drop=3,
                                       layer_blocks=blocks)
        plan = build_plan(arch, target, scores, layer_metric=metric, layer_blocks=blocks)
        loaded = ImportanceScores.load(scores.save(tmp_path / f"{metric}{blocks}.safetensors"), arch)
        assert build_plan(arch, target, loaded, layer_metric=metric, layer_blocks=blocks) == plan
        assert len(plan.keep_layers) == 3
        saved[metric, blocks] = loaded
    # a one-block scan holds only k=3; the all-sizes scan (layer_blocks=2) also serves k=2
    with pytest.raises(MegaslimError, match="computed for dropping 3 layers in up to 1 block"):
        build_plan(arch, replace(arch, num_layers=4), saved["block_loss", 1], layer_metric="block_loss")
    assert len(build_plan(arch, replace(arch, num_layers=4), saved["block_loss", 2], layer_metric="block_loss",
                          layer_blocks=2).keep_layers) == 4
    # greedy's first two removals
    order = saved["greedy_loss", 1].layer_greedy
    keep4 = build_plan(arch, replace(arch, num_layers=4), saved["greedy_loss", 1], layer_metric="greedy_loss")
    assert set(range(6)) - set(keep4.keep_layers) == set(torch.argsort(order)[:2].tolist())


@pytest.fixture(scope="module")
def depth_ref(deep_llama, tmp_path_factory):
    """The single-process scores of tests/workers/depth_scores.py on 6 rows (and the rows)."""
    d = tmp_path_factory.mktemp("depth_ref")
    torch.manual_seed(0)
    torch.save(torch.randint(0, 250, (6, 17)), d / "rows.pt")
    torchrun("depth_scores.py", deep_llama, 1, 1, d / "rows.pt", MBS, d / "ref.pt", nproc=1)
    return d / "rows.pt", torch.load(d / "ref.pt.rank0")


@pytest.mark.dist
@pytest.mark.parametrize("nproc, tp, pp", [(2, 2, 1), (2, 1, 1), (2, 1, 2), (4, 1, 2), (4, 2, 2)],
                         ids=["tp2", "dp2", "pp2", "pp2xdp2", "tp2xpp2"])
def test_depth_scores_do_not_depend_on_tp_pp_or_dp(deep_llama, depth_ref, tmp_path, nproc, tp, pp):
    """Every rank of a TP / DP / PP run holds the single-process block scores and greedy choice."""
    rows, ref = depth_ref
    torchrun("depth_scores.py", deep_llama, tp, pp, rows, MBS, tmp_path / "par.pt", nproc=nproc, timeout=600)
    for r in range(nproc):
        par = torch.load(tmp_path / f"par.pt.rank{r}")
        for key in ("block", "blocks"):
            assert torch.allclose(ref[key], par[key], atol=1e-5, equal_nan=True), (r, key)
        assert torch.equal(ref["greedy"], par["greedy"]) and ref["removed"] == par["removed"], r


def test_depth_requests_are_checked_before_compute():
    with pytest.raises(MegaslimError, match="prune.layer_blocks=3 is more blocks than the 2 layers"):
        check_depth_request(6, 4, metric="block_loss", blocks=3)
    with pytest.raises(MegaslimError, match="unset prune.drop_layers"):
        check_depth_request(6, 4, metric="greedy_loss", blocks=1, drop_layers=[1])
    check_depth_request(6, 4, metric="block_loss", blocks=2)


@pytest.mark.parametrize("overrides, needle", [
    (["prune.layer_metric=block_loss", "prune.export_config.num_layers=3", "prune.drop_contiguous=true"],
     "supersedes prune.drop_contiguous"),
    (["prune.layer_metric=greedy_loss", "prune.drop_layers=[1]"], "unset prune.drop_layers"),
    (["prune.layer_metric=block_loss"], "set prune.export_config.num_layers"),
    (["prune.layer_blocks=0"], "prune.layer_blocks=0 must be >= 1"),
    (["prune.layer_blocks=2", "prune.export_config.num_layers=3"], "prune.layer_metric=bi does not use it"),
    (["importance.layer_metrics=[bi,greedy_loss]"], "set prune.layer_metric=greedy_loss"),
    (["prune.layer_metric=block_loss", "prune.export_config.num_layers=3", "prune.drop_layers=[1]"],
     "set either prune.drop_layers or prune.export_config.num_layers"),
    (["prune.layer_metric=block_loss", "prune.drop_contiguous=true", "importance.scores_path=/s",
      "prune.export_config.num_layers=3"], "supersedes prune.drop_contiguous"),
    (["prune.layer_metric=greedy_loss", "prune.export_config.num_layers=3", "prune.iterative=2"], "prune.iterative=1"),
    (["prune.layer_metric=block_loss", "prune.target_params=1e6"], "prune.target_params tries several"),
    (["importance.layer_loss_samples=0"], "importance.layer_loss_samples must be >= 1"),
])
def test_bad_depth_configs_are_refused(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("[", r"\[")):
        load_config(None, overrides)


def test_good_depth_configs_load():
    load_config(None, ["prune.layer_metric=block_loss", "prune.export_config.num_layers=3", "prune.layer_blocks=2"])
    load_config(None, ["prune.layer_metric=greedy_loss", "prune.export_config.num_layers=3"])
    load_config(None, ["importance.layer_metrics=[bi,block_loss]", "importance.only=true",
                       "prune.export_config.num_layers=3"])
    load_config(None, ["prune.layer_metric=block_loss", "prune.export_config.num_layers=3",
                       "importance.scores_path=/s", "parallel.pipeline_model_parallel_size=2"])
    # PP > 1: the stages rerun their layers from their cached states (test_depth_scores_do_not_depend_on_...)
    load_config(None, ["prune.layer_metric=block_loss", "prune.export_config.num_layers=3",
                       "parallel.pipeline_model_parallel_size=2"])
    load_config(None, ["prune.layer_metric=greedy_loss", "prune.export_config.num_layers=3",
                       "parallel.pipeline_model_parallel_size=2", "parallel.tensor_model_parallel_size=2"])


@pytest.mark.dist
def test_prune_command_with_block_loss(tiny_llama_tok, tmp_path):
    """launch/prune.py end to end: block_loss scores saved with the others, the plan rebuilt from them;
    at PP=2 (each stage reruns its own layers) the same scores and plan as at PP=1."""
    text = ROOT / "tests" / "data" / "hamlet_excerpt.txt"
    runs = {}
    for nproc, pp in ((1, 1), (2, 2)):
        out = tmp_path / f"pp{pp}"
        torchrun(ROOT / "launch" / "prune.py", f"model.load={tiny_llama_tok}", f"output_dir={out}",
                 f"data.calib_path={text}", f"data.eval_path={text}", "data.seq_length=32", "importance.num_samples=4",
                 "importance.layer_loss_samples=4", "eval.num_samples=2", "prune.export_config.num_layers=2",
                 "prune.layer_metric=block_loss", f"parallel.pipeline_model_parallel_size={pp}", nproc=nproc,
                 timeout=600)
        runs[pp] = PrunePlan.load(out / "prune_plan.json"), ImportanceScores.load(out / "importance.safetensors")
        assert (out / "importance_layers.png").is_file()
    plan, scores = runs[1]
    assert scores.layer_block_loss.shape == (2, 4) and scores.settings["block_drop"] == 2
    dropped = sorted(set(range(4)) - set(plan.keep_layers))
    assert dropped[1] == dropped[0] + 1  # one contiguous block
    arch = plan.source_arch
    assert build_plan(arch, replace(arch, num_layers=2), scores, layer_metric="block_loss").keep_layers == \
        plan.keep_layers
    assert runs[2][0].keep_layers == plan.keep_layers
    assert torch.allclose(runs[2][1].layer_block_loss, scores.layer_block_loss, atol=1e-5, equal_nan=True)
