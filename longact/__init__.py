"""LongAct: saliency-guided sparse Q/K updates for long-context RL, built on verl."""

__version__ = "0.1.0"
