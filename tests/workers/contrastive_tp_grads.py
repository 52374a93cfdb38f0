"""Worker: the distillation projection at TP=N is one replicated parameter, trained, never a weight.

usage: torchrun --nproc-per-node N contrastive_tp_grads.py TEACHER_HF_DIR STUDENT_CKPT OUT_JSON
Builds the Trainer in-process (TP = world size) for a contrastive run between a width-pruned student and
its teacher, runs one step on fixed synthetic micro-batches and checks on every rank:
- the projection's initial weights, DP-reduced gradient (`weight.main_grad`) and updated weights are identical
  on every TP rank (all-gathered and compared exactly), the gradient is non-zero and the weights moved;
- the projection is not a parameter, state-dict or sharded-state-dict entry of the student.
Rank 0 writes {"loss": ..., "grad_norm": ...} to OUT_JSON.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    teacher_dir, student_ckpt, out_json = sys.argv[1:4]
    from megatron.core import parallel_state as ps

    from megaslim.config import load_config
    from megaslim.distill.train import PROJECTION, Models, Trainer
    from megaslim.runtime import init_runtime
    from megaslim.sources import load_model, resolve_source

    world = int(__import__("os").environ["WORLD_SIZE"])
    cfg = load_config(None, [f"output_dir={Path(out_json).parent / 'run'}", f"model.load={teacher_dir}",
                             f"parallel.tensor_model_parallel_size={world}", "data.seq_length=16",
                             "train.micro_batch_size=2", "train.global_batch_size=4", "train.lr=1e-2",
                             "train.warmup_iters=0", "train.train_iters=2",
                             "distill.intermediate_layer_pairs=[[1,3],[0,1]]",
                             "distill.intermediate_loss=contrastive"])
    init_runtime(tp=world, pp=1, seed=cfg.train.seed)
    teacher, t_arch, _ = load_model(cfg.model, resolve_source(teacher_dir))
    student, s_arch, _ = load_model(cfg.model, resolve_source(student_ckpt))
    assert s_arch.hidden_size != t_arch.hidden_size
    trainer = Trainer(cfg, Models(student, s_arch, teacher, t_arch), tokenizer_dir=None, eval_rows=None)
    proj = trainer.projection
    assert proj is not None and tuple(proj.weight.shape) == (t_arch.hidden_size, s_arch.hidden_size)
    assert not any(PROJECTION in n for n, _ in student.named_parameters())
    assert not any(PROJECTION in k for k in student.state_dict())
    assert not any(PROJECTION in k for k in student.sharded_state_dict())
    assert not hasattr(student, PROJECTION)

    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(trainer.num_micro):
        tokens = torch.randint(0, s_arch.vocab_size, (2, 16), generator=g)
        mask = (torch.rand(2, 16, generator=g) > 0.2).float()
        batches.append({"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": mask,
                        "position_ids": torch.arange(16).expand(2, 16).contiguous()})
    w0 = proj.weight.detach().clone()
    metrics = trainer.train_step(batches)
    grad = proj.weight.main_grad.detach().clone()
    w1 = proj.weight.detach().clone()

    group = ps.get_tensor_model_parallel_group()
    for name, t in (("initial weight", w0), ("gradient", grad), ("updated weight", w1)):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous(), group=group)
        for r, p in enumerate(parts):
            assert torch.equal(p, parts[0]), f"projection {name} differs between TP rank 0 and {r}"
    assert grad.abs().sum() > 0, "no gradient reached the projection"
    assert not torch.equal(w0, w1), "the optimizer did not update the projection"
    assert all(k in metrics for k in ("contrastive_1_3", "contrastive_0_1")), metrics
    if dist.get_rank() == 0:
        Path(out_json).write_text(json.dumps({k: metrics[k] for k in ("loss", "grad_norm", "contrastive_1_3")}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
