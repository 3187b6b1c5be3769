"""``longact ablate``: does a model rely on its salient Q/K channels?

Disrupt the channels a LongAct mask would choose (top-k by magnitude) at inference, and
as many random or lowest-magnitude ones, and compare accuracy by context length:
``disrupt`` (the hooks), ``runner`` (calibration, channel choice, evaluation), ``report``
(paired comparisons, markdown, JSON, plot).
"""

from longact.ablate.disrupt import MODES, CalibrationCapture, Disruption, replacement
from longact.ablate.report import compare, headline, write
from longact.ablate.runner import ARM_POLICIES, AblateError, Arm, ablate, plan_arms

__all__ = [
    "ARM_POLICIES",
    "MODES",
    "AblateError",
    "Arm",
    "CalibrationCapture",
    "Disruption",
    "ablate",
    "compare",
    "headline",
    "plan_arms",
    "replacement",
    "write",
]
