"""Saving matplotlib figures for users: headless backend, atomic PNG write."""
from __future__ import annotations

from pathlib import Path

from megaslim import io as mio


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and CI
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path, dpi: int = 110) -> Path:
    """tight_layout, write to a temporary file, rename into place, close the figure."""
    plt = pyplot()
    path = Path(path)
    fig.tight_layout()
    try:
        with mio.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")  # the temporary name has no .png suffix
    finally:
        plt.close(fig)
    return path
