"""PNG plots of importance scores: heads heatmap, layer bars, neuron and channel distributions."""
from __future__ import annotations

from pathlib import Path

from megaslim.figures import pyplot, save_png
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

    metrics = [("layer_bi", "Block Importance (1 - cos)")]
    if scores.layer_loss is not None:
        metrics.append(("layer_loss", "loss increase when skipped"))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(8, 2.8 * len(metrics)), squeeze=False)
    for ax, (name, title) in zip(axes[:, 0], metrics):
        v = getattr(scores, name).numpy()
        ax.bar(range(len(v)), v, color="tab:blue")
        ax.set(xlabel="layer", title=title)
    paths.append(save_png(fig, out / "importance_layers.png"))

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
