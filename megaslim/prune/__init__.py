"""Structured pruning: plans (what to keep), slicing of full tensors, and the resharding driver."""
