"""PNG heatmaps of a mixture of experts' scores: experts by layer (REAP, L2 form, routing frequency)."""
from __future__ import annotations

from pathlib import Path

from megaslim.figures import save_png


def plot_experts(plt, scores, out: Path) -> Path:
    """One experts-by-layer heatmap per expert score (`scores`: an ImportanceScores with expert tensors)."""
    panels = [(scores.expert_reap, "REAP (weight x |output|)"), (scores.expert_l2, "L2 of |output|"),
              (scores.expert_frequency, "routing frequency")]
    layers, experts = scores.expert_reap.shape
    fig, axes = plt.subplots(1, len(panels), figsize=(max(9, 3 * (experts * 0.3 + 2)), max(3, layers * 0.22 + 1.5)),
                             squeeze=False)
    for ax, (m, title) in zip(axes[0], panels):
        im = ax.imshow(m.float().numpy(), aspect="auto", cmap="viridis")
        ax.set(xlabel="expert", ylabel="layer", title=title)
        ax.set_xticks(range(0, experts, max(1, experts // 16)))
        ax.set_yticks(range(0, layers, max(1, layers // 16)))
        fig.colorbar(im, ax=ax)
    return save_png(fig, out / "importance_experts.png")
