"""PNG plots of importance scores: heads heatmap, layer bars, neuron and channel distributions."""
from __future__ import annotations

from pathlib import Path

import torch

from megaslim.figures import pyplot, save_png
from megaslim.importance.expert_plots import plot_experts
from megaslim.importance.scores import ImportanceScores


def plot_importance(scores: ImportanceScores, out_dir: str | Path) -> list[Path]:
    plt = pyplot()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(max(4, scores.heads.shape[1] * 0.5 + 2), max(3, scores.heads.shape[0] * 0.22 + 1)))
    im = ax.imshow(scores.heads.numpy(), aspect="auto", cmap="viridis")
    ax.set(xlabel="head", ylabel="layer", title="attention head importance")
    fig.colorbar(im, ax=ax)
    paths.append(save_png(fig, out / "importance_heads.png"))
    if scores.expert_reap is not None:  # a mixture of experts
        paths.append(plot_experts(plt, scores, out))

    panels = _layer_panels(scores)
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.8 * len(panels)), squeeze=False)
    for ax, (v, xlabel, title, marked) in zip(axes[:, 0], panels):
        colors = ["tab:red" if i in marked else "tab:blue" for i in range(len(v))]
        ax.bar(range(len(v)), v.numpy(), color=colors)
        ax.set(xlabel=xlabel, title=title)
    paths.append(save_png(fig, out / "importance_layers.png"))
    if scores.layer_block_loss is not None and scores.layer_block_loss.isfinite().sum(1).gt(0).sum() > 1:
        paths.append(_block_heatmap(plt, scores.layer_block_loss, out))

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    n = scores.neurons
    axes[0].boxplot([row.numpy() for row in n], showfliers=False)
    axes[0].set(xlabel="layer", ylabel="score", title=f"MLP neuron scores ({n.shape[1]} per layer)")
    axes[0].set_xticks(range(1, n.shape[0] + 1, max(1, n.shape[0] // 10)))
    c = scores.channels.sort(descending=True).values.numpy()
    axes[1].plot(c)
    axes[1].set(xlabel="channel rank", ylabel="score", title=f"embedding channel scores (hidden {len(c)})")
    paths.append(save_png(fig, out / "importance_distributions.png"))
    return paths


def _layer_panels(scores: ImportanceScores) -> list[tuple]:
    """(values, x label, title, bars drawn red) of each layer metric present, BI first; the joint depth
    scores (block scan for the k asked, greedy removal order) beside it."""
    panels = [(scores.layer_bi, "layer", "Block Importance (1 - cos)", set())]
    if scores.layer_loss is not None:
        panels.append((scores.layer_loss, "layer", "loss increase when skipped", set()))
    if scores.layer_block_loss is not None:  # the scan for the k asked, by the block's first layer
        k = scores.layer_block_loss.shape[0]
        scan = scores.layer_block_loss[k - 1]
        scan = scan[scan.isfinite()]
        best = {int(scan.argmin())} if len(scan) else set()
        panels.append((scan, "first layer of the block",
                       f"loss increase with {k} consecutive layers removed (block_loss; red: least)", best))
    if scores.layer_greedy is not None:  # removal step + 1 (0 = kept), so early removals stand tall
        g = scores.layer_greedy.double()
        removed = g.isfinite()
        steps = torch.where(removed, removed.sum() - g, torch.zeros_like(g))  # steps run 0 .. removed - 1
        panels.append((steps, "layer", "greedy_loss: removed earlier = taller (red: removed)",
                       set(removed.nonzero().flatten().tolist())))
    return panels


def _block_heatmap(plt, m, out: Path) -> Path:
    """layer_blocks > 1: the loss increase of every block size (rows) at every start (columns)."""
    fig, ax = plt.subplots(figsize=(max(5, m.shape[1] * 0.3 + 2), max(3, m.shape[0] * 0.3 + 1)))
    v = m.clone()
    v[~v.isfinite()] = float("nan")
    im = ax.imshow(v.numpy(), aspect="auto", cmap="viridis", origin="lower",
                   extent=(-0.5, m.shape[1] - 0.5, 0.5, m.shape[0] + 0.5))
    ax.set(xlabel="first layer of the block", ylabel="block size", title="block_loss: loss increase")
    ax.set_yticks(range(1, m.shape[0] + 1, max(1, m.shape[0] // 10)))
    fig.colorbar(im, ax=ax)
    return save_png(fig, out / "importance_blocks.png")
