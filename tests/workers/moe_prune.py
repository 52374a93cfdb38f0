"""Worker: score an MoE at TP/PP/EP on given rows, keep EXPERTS experts of NEURONS neurons each, rebuild the
student through scratch files (at target TP TTP, 0 = unchanged) and export it to HF.

usage: moe_prune.py SOURCE TP PP EP ROWS_PT EXPERTS NEURONS TTP SCRATCH EXPORT_DIR
"""
import sys
from pathlib import Path

import torch

from megaslim.config import ExportConfigShape, ImportanceConfig, ModelConfig
from megaslim.importance.calibrate import activation_scores
from megaslim.importance.scores import ImportanceScores
from megaslim.runtime import init_runtime, main_guard
from megaslim.sources import load_model


def main():
    src, tp, pp, ep, rows_pt = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
    experts, neurons, ttp, scratch, export_dir = *map(int, sys.argv[6:9]), Path(sys.argv[9]), sys.argv[10]
    init_runtime(tp=tp, pp=pp, ep=ep)
    from megaslim.model.hf import export_hf
    from megaslim.prune.plan import build_plan, target_shape
    from megaslim.prune.student import student_from_plan

    model, arch, _ = load_model(ModelConfig(load=src))
    scores = ImportanceScores(**activation_scores(model, arch, torch.load(rows_pt), ImportanceConfig(),
                                                  micro_batch_size=2))
    target = target_shape(arch, ExportConfigShape(num_moe_experts=experts, moe_ffn_hidden_size=neurons),
                          tp=ttp or tp, hf_export=True)
    plan = build_plan(arch, target, scores)
    student = student_from_plan(model, plan, ModelConfig(), scratch=scratch, target_tp=ttp or None)
    export_hf(student, plan.target_arch, export_dir, tokenizer_dir=None)


if __name__ == "__main__":
    main_guard(main)
