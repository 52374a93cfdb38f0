"""Unstructured and 2:4 weight sparsity (magnitude, Wanda) of the decoder's linears, and the masks that
keep pruned weights at zero through distillation (docs/sparsity.md)."""
