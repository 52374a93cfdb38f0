"""The Minitron comparison table (docs/results.md): rows, stats, report, stages/runner/workers, cli."""
