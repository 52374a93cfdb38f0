"""Joint depth scores from cached layer inputs: `block_loss` (the LM loss with each contiguous block of
layers removed) and `greedy_loss` (layers removed a few per round, the rest re-scored after each round).

Per calibration micro-batch the hidden state entering every layer is cached once; a candidate that removes
layers i..j restarts from the state cached before i and reruns only the layers after j (plus the output
head), so a full block scan for k layers costs about (L - k)^2 / 2 layer forwards instead of L - k + 1
full passes. Layers run TP-sharded as in the model's own forward; rows are split over DP and the loss
sums all-reduced, so every rank holds the same scores and makes the same choice. Under PP each stage
caches the states entering its own layers; a candidate starts on the stage holding its cached state, each
later stage reruns its layers after the block on the state the previous stage sends (p2p), the last stage
computes the loss and the sums are reduced over the pipeline group too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megaslim.errors import MegaslimError
from megaslim.model.arch import ModelArch
from megaslim.model.forward import make_microbatches
from megaslim.model.logits import vocab_parallel_ce
from megaslim.runtime import rank0_print
from megaslim.runtime.layout import ParallelLayout

GREEDY_MAX_ROUNDS = 5  # greedy_loss re-scores at most this many times: ceil(k / 5) layers per round


class _Stop(Exception):
    """Raised by the stage's first layer's pre-hook: its input and kwargs are all the cache needs."""


@dataclass
class BatchCache:
    """One micro-batch on one stage: states[p] enters active position p (for this stage's positions;
    on the last stage states[n] leaves the last active layer)."""
    states: dict[int, torch.Tensor]
    shape: tuple[int, ...]  # [s, b, hidden] of every state (what a stage receives)
    kwargs: dict  # what the decoder passes every layer besides hidden_states (mask, rotary embedding, ...)
    labels: torch.Tensor
    mask: torch.Tensor


class LayerRunner:
    """Runs a GPTModel's decoder layers (this pipeline stage's) one at a time from cached states."""

    def __init__(self, model, vocab_size: int):
        from megatron.core import parallel_state as ps

        self.model, self.vocab_size = model, vocab_size
        self.layers = {layer.layer_number - 1: layer for layer in model.decoder.layers}  # global index -> layer
        if not self.layers:
            raise MegaslimError("block_loss/greedy_loss need layers on every pipeline stage")
        self.device = next(model.parameters()).device
        self.dtype = getattr(model.config, "pipeline_dtype", None) or model.config.params_dtype
        self.pp, self.stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
        self.first, self.last = self.stage == 0, self.stage == self.pp - 1
        owner = torch.zeros(model.config.num_layers, dtype=torch.float64)
        owner[list(self.layers)] = self.stage
        if self.pp > 1:  # every layer's stage, on every rank (each layer has one owner: the sum is it)
            owner = ParallelLayout.all_reduce(owner, ps.get_pipeline_model_parallel_group())
            self.next_rank = ps.get_pipeline_model_parallel_next_rank()
            self.prev_rank = ps.get_pipeline_model_parallel_prev_rank()
        self.owner = [int(s) for s in owner.tolist()]

    def stage_of(self, active: list[int], p: int) -> int:
        """The stage holding the state that enters active position p (p == n: the last stage's output)."""
        return self.pp - 1 if p == len(active) else self.owner[active[p]]

    def _send(self, h: torch.Tensor) -> None:
        dist.send(h.to(self.dtype).contiguous(), self.next_rank)

    def _recv(self, shape: tuple[int, ...]) -> torch.Tensor:
        h = torch.empty(shape, dtype=self.dtype, device=self.device)
        dist.recv(h, self.prev_rank)
        return h

    def _enter(self, batch: dict, shape: tuple[int, ...]) -> tuple[torch.Tensor, dict]:
        """The state entering this stage's first layer (the embedding, or received from the previous
        stage) and the other arguments the decoder passes its layers."""
        seen, first = {}, self.layers[min(self.layers)]
        if not self.first:
            self.model.set_input_tensor(self._recv(shape))

        def grab(module, args, kwargs):
            seen.update(kwargs)
            raise _Stop

        handle = first.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.model(batch["tokens"], batch["position_ids"], None)
        except _Stop:
            pass
        finally:
            handle.remove()
            if not self.first:
                self.model.set_input_tensor(None)
        return seen.pop("hidden_states"), seen

    def layer(self, index: int, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
        return self.layers[index](hidden_states=h, **kwargs)[0]

    def cache(self, batch: dict, active: list[int]) -> BatchCache:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        shape = (batch["tokens"].shape[1], batch["tokens"].shape[0], self.model.config.hidden_size)
        h, kwargs = self._enter(batch, shape)
        states = {}
        for p, i in enumerate(active):
            if i in self.layers:
                states[p] = h
                h = self.layer(i, h, kwargs)
        if self.last:
            states[len(active)] = h
        else:
            self._send(h)
        return BatchCache(states, shape, kwargs, batch["labels"], batch["loss_mask"])

    def loss_sum(self, c: BatchCache, h: torch.Tensor) -> torch.Tensor:
        """[2] (sum of token losses, token count) of the final hidden state `h` [s, b, hidden]."""
        loss = self.token_losses(c, h)
        return torch.stack([(loss * c.mask).sum(), c.mask.sum().double()]).cpu()

    def token_losses(self, c: BatchCache, h: torch.Tensor) -> torch.Tensor:
        """[b, s] next-token losses (float64) from the final hidden state `h`: final norm, head, CE."""
        m = self.model
        final = getattr(m.decoder, "final_layernorm", None)
        h = final(h) if final is not None else h
        weight = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else None
        logits, _ = m.output_layer(h, weight=weight)
        return vocab_parallel_ce(logits.transpose(0, 1).contiguous(), c.labels, self.vocab_size).double()

    def row_losses(self, c: BatchCache, h: torch.Tensor) -> torch.Tensor:
        """[b] mean token loss of each row (padded rows: NaN) from the final hidden state `h` (last stage)."""
        return ((self.token_losses(c, h) * c.mask).sum(1) / c.mask.sum(1).double()).cpu()

    def removed(self, c: BatchCache, active: list[int], p: int, q: int) -> torch.Tensor:
        """loss_sum with active positions p..q-1 removed (p == q == len(active): the model as it is), on
        the last stage; zeros on the others. Every stage of the pipeline calls it for the same (p, q)."""
        start = self.stage_of(active, p)
        if self.stage < start:
            return torch.zeros(2, dtype=torch.float64)
        h = c.states[p] if self.stage == start else self._recv(c.shape)
        for i in active[q:]:
            if i in self.layers:
                h = self.layer(i, h, c.kwargs)
        if not self.last:
            self._send(h)
            return torch.zeros(2, dtype=torch.float64)
        return self.loss_sum(c, h)

    def reduce(self, total: torch.Tensor) -> torch.Tensor:
        """Loss sums of this rank's stage and rows -> the sums over the pipeline and the DP ranks."""
        from megatron.core import parallel_state as ps

        if self.pp > 1:  # only the last stage holds losses: the others add zeros
            total = ParallelLayout.all_reduce(total, ps.get_pipeline_model_parallel_group())
        if ps.get_data_parallel_world_size() > 1:
            total = ParallelLayout.all_reduce(total, ps.get_data_parallel_group())
        return total


def _batches(rows: torch.Tensor, micro_batch_size: int) -> list[dict]:
    return make_microbatches(ParallelLayout.from_groups().shard_rows(rows), micro_batch_size)


def candidate_losses(runner: LayerRunner, batches: list[dict], active: list[int],
                     spans: list[tuple[int, int]]) -> tuple[torch.Tensor, float]:
    """(mean loss with each span (p, q) of active positions removed, the loss with none removed),
    over every DP rank's rows, on every rank."""
    n = len(active)
    total = torch.zeros(len(spans) + 1, 2, dtype=torch.float64)
    with torch.no_grad():
        for batch in batches:
            c = runner.cache(batch, active)
            total[-1] += runner.removed(c, active, n, n)
            for s, (p, q) in enumerate(spans):
                total[s] += runner.removed(c, active, p, q)
            del c
    total = runner.reduce(total)
    mean = total[:, 0] / total[:, 1].clamp_min(1)
    return mean[:-1], float(mean[-1])


# -- cost -------------------------------------------------------------------------------------------


def _head_in_layers(arch: ModelArch) -> float:
    """The output head's matmul in units of one decoder layer's matmuls (attention scores ignored)."""
    h, hd = arch.hidden_size, arch.kv_channels
    attn = h * hd * (2 * arch.num_attention_heads + 2 * arch.num_query_groups)
    mlp = (3 if arch.gated else 2) * h * arch.ffn_hidden_size
    return arch.vocab_size * h / (attn + mlp)


def span_cost(n: int, spans: list[tuple[int, int]]) -> int:
    """Layer forwards per micro-batch: the cache (n) plus the layers after each span."""
    return n + sum(n - q for _, q in spans)


def _say_cost(what: str, arch: ModelArch, layer_fwd: int, heads: int, rows: int, seq: int) -> None:
    full = arch.num_layers + _head_in_layers(arch)
    equiv = (layer_fwd + heads * _head_in_layers(arch)) / full
    rank0_print(f"{what}: {layer_fwd} layer forwards + {heads} output heads on {rows} rows x {seq} tokens "
                f"(about {equiv:.0f} full forward passes)")


# -- block_loss -------------------------------------------------------------------------------------


def block_spans(num_layers: int, drop: int, blocks: int) -> list[tuple[int, int]]:
    """Every (start, end) block: of size `drop` only (blocks=1), or of each size 1..drop (blocks > 1)."""
    sizes = [drop] if blocks == 1 else range(1, drop + 1)
    return [(i, i + s) for s in sizes for i in range(num_layers - s + 1)]


def block_loss_scores(model, arch: ModelArch, rows: torch.Tensor, *, drop: int, blocks: int = 1,
                      micro_batch_size: int) -> torch.Tensor:
    """[drop, L] loss increase with layers i..i+s-1 removed at row s-1, column i (inf where the block
    runs past the last layer; NaN for sizes not scanned: only size `drop` when blocks=1)."""
    L = arch.num_layers
    if not 1 <= drop < L:
        raise MegaslimError(f"block_loss drops {drop} of {L} layers; it must drop between 1 and {L - 1}")
    if not 1 <= blocks <= drop:
        raise MegaslimError(f"prune.layer_blocks={blocks} must be between 1 and the {drop} layers to drop")
    spans = block_spans(L, drop, blocks)
    _say_cost(f"block_loss (k={drop}, {len(spans)} blocks)", arch, span_cost(L, spans) * math.ceil(
        len(rows) / micro_batch_size), (len(spans) + 1) * math.ceil(len(rows) / micro_batch_size),
        len(rows), rows.shape[1] - 1)
    runner = LayerRunner(model, arch.vocab_size)
    losses, base = candidate_losses(runner, _batches(rows, micro_batch_size), list(range(L)), spans)
    out = torch.full((drop, L), float("nan"), dtype=torch.float64)
    sizes = sorted({q - p for p, q in spans})
    for s in sizes:
        out[s - 1, L - s + 1:] = float("inf")
    for (p, q), v in zip(spans, losses.tolist()):
        out[q - p - 1, p] = v - base
    return out


# -- greedy_loss ------------------------------------------------------------------------------------


def greedy_rounds(drop: int, max_rounds: int = GREEDY_MAX_ROUNDS) -> list[int]:
    """Layers removed in each round: `drop` split into at most `max_rounds` near-equal rounds, larger first."""
    rounds = max(1, min(drop, max_rounds))
    return [drop // rounds + (1 if r < drop % rounds else 0) for r in range(rounds)]


def greedy_cost(num_layers: int, rounds: list[int]) -> tuple[int, int]:
    """(layer forwards, output heads) per micro-batch over every round."""
    n, layer_fwd, heads = num_layers, 0, 0
    for r in rounds:
        layer_fwd += span_cost(n, [(p, p + 1) for p in range(n)])
        heads += n + 1
        n -= r
    return layer_fwd, heads


def greedy_loss_order(model, arch: ModelArch, rows: torch.Tensor, *, drop: int, micro_batch_size: int,
                      max_rounds: int = GREEDY_MAX_ROUNDS) -> tuple[torch.Tensor, list[dict]]:
    """([L] removal step of each layer, inf for the kept ones; the rounds' records). Each round scores
    removing each remaining layer alone from the partly pruned model and removes the cheapest ones."""
    L = arch.num_layers
    if not 1 <= drop < L:
        raise MegaslimError(f"greedy_loss drops {drop} of {L} layers; it must drop between 1 and {L - 1}")
    rounds = greedy_rounds(drop, max_rounds)
    n_batches = math.ceil(len(rows) / micro_batch_size)
    layer_fwd, heads = greedy_cost(L, rounds)
    _say_cost(f"greedy_loss (k={drop} in {len(rounds)} rounds of {rounds})", arch, layer_fwd * n_batches,
              heads * n_batches, len(rows), rows.shape[1] - 1)
    runner, batches = LayerRunner(model, arch.vocab_size), _batches(rows, micro_batch_size)
    active, order, records = list(range(L)), torch.full((L,), float("inf"), dtype=torch.float64), []
    step = 0
    for r, count in enumerate(rounds):
        losses, base = candidate_losses(runner, batches, active, [(p, p + 1) for p in range(len(active))])
        ranked = sorted(range(len(active)), key=lambda p: (losses[p].item(), p))[:count]
        removed = [active[p] for p in ranked]
        for layer in removed:
            order[layer] = step
            step += 1
        records.append({"round": r, "loss_before": base, "removed": removed,
                        "increase": [losses[p].item() - base for p in ranked]})
        rank0_print(f"greedy_loss round {r + 1}/{len(rounds)}: removed {removed} (loss {base:.4f} before)")
        active = [i for i in active if i not in set(removed)]
    return order, records


def depth_scores(model, arch: ModelArch, rows: torch.Tensor, *, metrics: list[str], drop: Optional[int],
                 blocks: int, micro_batch_size: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The joint depth scores `metrics` asks for ({layer_block_loss, layer_greedy}, settings)."""
    out, settings = {}, {}
    wanted = [m for m in metrics if m in ("block_loss", "greedy_loss")]
    if wanted and drop is None:
        raise MegaslimError(f"layer metrics {wanted} score removing k layers: set prune.export_config.num_layers")
    if "block_loss" in wanted:
        out["layer_block_loss"] = block_loss_scores(model, arch, rows, drop=drop, blocks=blocks,
                                                    micro_batch_size=micro_batch_size)
        settings.update(block_drop=drop, layer_blocks=blocks)
    if "greedy_loss" in wanted:
        out["layer_greedy"], settings["greedy_rounds"] = greedy_loss_order(
            model, arch, rows, drop=drop, micro_batch_size=micro_batch_size)
        settings["greedy_drop"] = drop
    return out, settings
