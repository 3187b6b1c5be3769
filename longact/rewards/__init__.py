"""LongAct rewards: rule-based scores for the long-context tasks (``compute_score``).

Point verl at this file: ``reward.custom_reward_function.path=<this file>`` and
``reward.custom_reward_function.name=compute_score``.
"""

from longact.rewards.scoring import DATA_SOURCES, compute_score, extract_choice

__all__ = ["DATA_SOURCES", "compute_score", "extract_choice"]
