"""What people read: the rank-0 summary table at the end of a command, and a wall-clock timer."""
from __future__ import annotations

import time

from megaslim.runtime.layout import ParallelLayout


def is_rank0() -> bool:
    return ParallelLayout.is_writer()


def summary_table(title: str, rows: list[tuple[str, object]]) -> None:
    """Print a two-column summary table on rank 0."""
    if not is_rank0():
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for key, value in rows:
        table.add_row(str(key), _fmt(value))
    Console().print(table)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int) and abs(value) >= 10000:
        return f"{value:,}"
    return str(value)


class Timer:
    def __init__(self):
        self.t0 = time.time()

    @property
    def seconds(self) -> float:
        return time.time() - self.t0
