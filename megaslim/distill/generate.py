"""Synthetic data: the teacher continues prompts drawn from the corpus (batched sampling with
temperature / top-p) into a JSONL corpus the student then trains on with plain LM loss.

Prompts: `generate.num_prompts` windows of `generate.prompt_length` tokens taken at seeded random
positions inside the documents of `data.train_path` (the trailing EOS of a document is never part of
a window), or the documents of `generate.prompts_path` (JSONL "text" / .txt), tokenized without BOS.
Prompts of equal length are batched together, so no padding and no attention masks are needed.

Decoding: megatron-core's static KV cache (`StaticInferenceContext`: prompt prefill, then one token per
step), which 0.16.1 provides and which runs on CPU with the local layer spec (tested equal to full
recompute); `generate.kv_cache=false` recomputes the whole sequence for every new token instead.
TP shards the model (logits are gathered for sampling only, one position per step); DP splits the
batches; PP is refused (generation runs one stage). Sampling is seeded per batch from
`generate.seed` (default `train.seed`), so the output does not depend on the DP layout.
The command that drives this library is `megaslim.commands.generate` (`launch/generate.py`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megaslim import io as mio
from megaslim.data.indexed import open_indexed
from megaslim.data.packing import read_documents
from megaslim.errors import MegaslimError


# --------------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------------
def draw_prompts(prefix, *, num_prompts: int, prompt_length: int, seed: int) -> list[list[int]]:
    """`num_prompts` windows of `prompt_length` tokens from the documents of an indexed dataset, at
    seeded random positions (documents weighted by how many windows they hold; the last token of a
    document, its EOS, is never included)."""
    ds = open_indexed(prefix)
    lengths = ds.sequence_lengths.astype(np.int64)
    windows = np.maximum(lengths - prompt_length, 0)  # starts 0..len-1-L: the window ends before EOS
    if num_prompts < 1:
        raise MegaslimError("empty prompt set: generate.num_prompts must be >= 1")
    if windows.sum() == 0:
        raise MegaslimError(
            f"empty prompt set: no document of {prefix} holds more than generate.prompt_length="
            f"{prompt_length} tokens; use a shorter prompt_length, a larger corpus, or generate.prompts_path")
    rng = np.random.default_rng(seed)
    docs = rng.choice(len(lengths), size=num_prompts, p=windows / windows.sum())
    offsets = (rng.random(num_prompts) * windows[docs]).astype(np.int64)
    return [ds.get(int(d), offset=int(o), length=prompt_length).astype(np.int64).tolist()
            for d, o in zip(docs, offsets)]


def prompts_from_file(path, tokenizer, *, num_prompts: int) -> list[list[int]]:
    """The first `num_prompts` documents of a .jsonl ("text") / .txt file, tokenized without BOS."""
    out = []
    for lineno, text in enumerate(read_documents(path), 1):
        if len(out) == num_prompts:
            break
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if isinstance(text, str) else list(text)
        if not ids:
            raise MegaslimError(f"{path}: prompt {lineno} is empty")
        out.append([int(i) for i in ids])
    if not out:
        raise MegaslimError(f"empty prompt set: {path} holds no prompts")
    return out


def make_batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped into batches of equal prompt length (deterministic order)."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and len(prompts[batches[-1][0]]) == len(prompts[i]):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


# --------------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------------
def sample_next(logits: torch.Tensor, *, temperature: float, top_p: float,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids [b] from logits [b, V] (real vocabulary only): greedy at temperature 0, else
    softmax(logits / temperature) restricted to the smallest set of tokens whose probability reaches
    top_p (the most probable token is always kept)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the more probable tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _last_logits_full_recompute(model, tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    pos = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    shard = model(tokens, pos, None)[:, -1].contiguous()  # [b, V/TP]
    return gather_from_tensor_model_parallel_region(shard)


@torch.no_grad()
def generate_batch(model, prompts: torch.Tensor, *, vocab_size: int, max_new_tokens: int,
                   temperature: float, top_p: float, generator: Optional[torch.Generator],
                   eos_id: Optional[int], kv_cache: bool = True) -> list[list[int]]:
    """Continuations (new tokens, cut after the first EOS when eos_id is given) of equal-length
    prompts [b, L] by this rank's model shard (PP=1; every TP rank calls it and gets the same ids)."""
    from megatron.core import parallel_state as ps

    model.eval()
    device = next(model.parameters()).device
    b, length = prompts.shape
    tokens = prompts.to(device=device, dtype=torch.long)
    ctx = None
    if kv_cache:
        static_context = static_inference_context_class()
        if static_context is not None:
            ctx = static_context(b, length + max_new_tokens)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    step_in = tokens
    tp_world = ps.get_tensor_model_parallel_world_size()
    for _ in range(max_new_tokens):
        if ctx is not None:
            start = ctx.sequence_len_offset
            pos = torch.arange(start, start + step_in.shape[1], device=device).unsqueeze(0).expand(b, -1)
            logits = model(step_in, pos, None, inference_context=ctx, runtime_gather_output=True)[:, -1]
            ctx.sequence_len_offset += step_in.shape[1]
        else:
            logits = _last_logits_full_recompute(model, tokens)
        nxt = sample_next(logits[:, :vocab_size], temperature=temperature, top_p=top_p, generator=generator)
        if tp_world > 1:  # identical already (same gathered logits, same generator); make it certain
            dist.broadcast(nxt, src=ps.get_tensor_model_parallel_src_rank(),
                           group=ps.get_tensor_model_parallel_group())
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        tokens = torch.cat([tokens, nxt.unsqueeze(1)], dim=1)
        step_in = nxt.unsqueeze(1)
        if eos_id is not None and bool(done.all()):
            break
    out = []
    for row in tokens[:, length:].tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id) + 1]
        out.append(row)
    return out


def static_inference_context_class():
    """megatron-core's static-batching KV cache (0.16.1 and the current releases), or None where a
    release no longer has it: generation then recomputes the full sequence per token."""
    try:
        from megatron.core.inference.contexts.static_context import StaticInferenceContext
    except ImportError:
        try:
            from megatron.core.inference.contexts import StaticInferenceContext
        except ImportError:
            return None
    return StaticInferenceContext


def batch_generator(seed: int, batch_no: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + batch_no) % (2 ** 63))
    return g


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------
def write_jsonl(path, records: list[dict]) -> Path:
    """One JSON object per line (UTF-8), written atomically and durably: a reader never sees half a corpus."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return mio.atomic_write(path, text.encode("utf-8"), durable=True)


def to_record(tokenizer, prompt: list[int], completion: list[int], eos_id: Optional[int]) -> dict:
    finished = eos_id is not None and bool(completion) and completion[-1] == eos_id
    body = completion[:-1] if finished else completion
    return {"text": tokenizer.decode(prompt + body), "prompt": tokenizer.decode(prompt),
            "completion": tokenizer.decode(body), "prompt_tokens": len(prompt),
            "completion_tokens": len(body), "finished": finished}
