"""Minitron activation-based importance: heads, query groups, neurons, channels and layers."""
