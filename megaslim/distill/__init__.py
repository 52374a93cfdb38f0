"""Knowledge distillation of a pruned student from its teacher (Minitron)."""
from megaslim.distill.losses import (
    BALANCE_EPS,
    HIDDEN_KINDS,
    KD_KINDS,
    HiddenProjection,
    balance_to_logit_loss,
    combine_losses,
    hidden_state_loss,
    hidden_state_loss_per_token,
    intermediate_layer_pairs,
    logit_kd_loss,
    logit_kd_per_token,
    masked_mean,
    masked_sum_and_count,
    vocab_parallel_log_softmax,
)

__all__ = [
    "BALANCE_EPS", "HIDDEN_KINDS", "KD_KINDS", "HiddenProjection", "balance_to_logit_loss", "combine_losses",
    "hidden_state_loss", "hidden_state_loss_per_token", "intermediate_layer_pairs",
    "logit_kd_loss", "logit_kd_per_token", "masked_mean", "masked_sum_and_count",
    "vocab_parallel_log_softmax",
]
