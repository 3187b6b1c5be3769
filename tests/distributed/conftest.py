"""One small local Ray cluster for the coordinator's Ray tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # longact_ranks


@pytest.fixture(scope="session")
def ray_cluster():
    """Ray is one of LongAct's dependencies: without it these tests error, never skip."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    if started:
        ray.shutdown()
