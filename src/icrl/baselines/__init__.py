"""Baselines trained online (not from stored histories): RL² (rl2.py)."""
