"""megaslim: Minitron-style pruning and distillation of LLMs on top of megatron-core."""
__version__ = "0.1.0"
