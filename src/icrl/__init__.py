"""In-context reinforcement learning: Algorithm Distillation and Decision Transformers."""
from .envs.gym import register_envs

__version__ = "0.1.0"

register_envs()
