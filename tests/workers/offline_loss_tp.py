"""Worker: offline top-k KL (stored teacher top-k) == online top-k KL at TP=N, gradients included.

usage: torchrun --nproc-per-node N offline_loss_tp.py OUT_DIR
Every rank builds the same full logits (padded vocab with huge values in the padded columns), keeps its
own vocab shard, computes the teacher's top-k log-probs from its shard (`topk_logprobs`), writes them to
a store through `ShardWriter` (TP rank 0), reads them back through `TopKStore`, and checks against
`logit_kd_per_token(kind="topk")` on the same shards and against the full-vocab reference. Also imported
by tests/test_offline_logits.py for the same checks at TP=1 (`check_all`).
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from megaslim.distill import logit_kd_per_token
from megaslim.distill import offline as off
from megaslim.runtime import init_runtime, main_guard

VOCAB, PADDED = 13, 16  # 3 padded columns: all on the last rank at TP=2
CASES = [(5, 1.0), (8, 2.0), (13, 0.5)]  # (k, temperature); k = 13: every real token


def make_logits(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, PADDED, generator=g) * 2
    teacher = torch.randn(*shape, PADDED, generator=g) * 2
    student[..., VOCAB:] = 1e4
    teacher[..., VOCAB:] = 3e4
    mask = (torch.rand(*shape, generator=g) > 0.3).float()
    return student, teacher, mask


def write_store(out: Path, idx, logp, text, *, k, dtype="float32"):
    """A minimal store holding one 'sample' per row of idx/logp [n, S, k]."""
    (out / off.SHARDS).mkdir(parents=True, exist_ok=True)
    w = off.ShardWriter(out / off.SHARDS, tag="000", dtype=dtype, samples_per_shard=2)
    w.add(sample_ids=torch.arange(idx.shape[0]), text=text, topk_idx=idx, topk_logp=logp)
    w.flush()
    meta = {"format": off.FORMAT, "version": off.VERSION, "top_k": k, "num_samples": idx.shape[0],
            "dtype": dtype, "shards": w.records,
            "teacher": {"arch": {"vocab_size": VOCAB}, "tokenizer_fingerprint": "x"},
            "data": {"seq_length": text.shape[1] - 1, "seed": 0}}
    (out / off.INDEX).write_text(json.dumps(meta))
    return off.TopKStore.open(out)


def check_all(out: Path, rank: int = 0, tp: int = 1) -> int:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    part = PADDED // tp
    checked = 0
    student, teacher, mask = make_logits(4, 6, seed=11)  # [n samples, S, V]: megatron's [b, s, V]
    s_shard = lambda x: x[..., rank * part:(rank + 1) * part]  # noqa: E731
    text = torch.randint(0, VOCAB, (4, 7))
    for k, tau in CASES:
        idx, logp = off.topk_logprobs(s_shard(teacher), vocab_size=VOCAB, k=k)
        ref_logp = F.log_softmax(teacher[..., :VOCAB], dim=-1)
        ref_vals, ref_idx = ref_logp.topk(k, dim=-1)
        assert torch.equal(idx, ref_idx), (rank, k)
        torch.testing.assert_close(logp, ref_vals, rtol=0, atol=1e-6)
        # float32 storage: equal to rounding; float16 storage: log-probs rounded to ~3 digits
        for dtype, rtol, atol in (("float32", 1e-6, 1e-5), ("float16", 3e-3, 3e-3)):
            d = out / f"k{k}-t{tau}-{dtype}-r{rank}"
            store = write_store(d, idx, logp, text, k=k, dtype=dtype)
            rows = store.read([0, 1, 2, 3], top_k=k)
            assert torch.equal(rows["text"].long(), text) and torch.equal(rows["topk_idx"].long(), idx)
            for sub_k in sorted({k, max(1, k - 2)}):
                on_s = s_shard(student).clone().requires_grad_(True)
                on = logit_kd_per_token(student_logits=on_s, teacher_logits=s_shard(teacher), vocab_size=VOCAB,
                                        kind="topk", temperature=tau, top_k=sub_k)
                ((on * mask).sum() / mask.sum()).backward()
                off_s = s_shard(student).clone().requires_grad_(True)
                offl = off.offline_topk_kl_per_token(student_logits=off_s, topk_idx=rows["topk_idx"],
                                                     topk_logp=rows["topk_logp"].float(), vocab_size=VOCAB,
                                                     temperature=tau, top_k=sub_k)
                ((offl * mask).sum() / mask.sum()).backward()
                what = f"rank {rank} k={k} sub_k={sub_k} tau={tau} {dtype}"
                torch.testing.assert_close(offl.detach(), on.detach(), rtol=rtol, atol=atol, msg=what)
                g_on = gather_from_tensor_model_parallel_region(on_s.grad)
                g_off = gather_from_tensor_model_parallel_region(off_s.grad)
                torch.testing.assert_close(g_off, g_on, rtol=rtol, atol=atol, msg=what)
                assert torch.all(g_off[..., VOCAB:] == 0), what
                checked += 1
    return checked


def main():
    out = Path(sys.argv[1])
    rt = init_runtime(tp=2)
    from megatron.core import parallel_state as ps

    n = check_all(out, rank=ps.get_tensor_model_parallel_rank(), tp=2)
    print(f"offline_loss_tp rank {rt.rank} OK {n} cases at TP=2", flush=True)


if __name__ == "__main__":
    main_guard(main)
