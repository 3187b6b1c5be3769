"""The task runner's checks that a run with longact.enable=true is really LongAct."""

from __future__ import annotations

import pytest

from longact.train.task_runner import LongActInactive, check_first_step, check_ranks_started


def test_every_rank_must_have_started_longact():
    check_ranks_started({"attached": [0, 1, 2, 3], "world_size": 4}, "r")
    with pytest.raises(LongActInactive, match=r"run r: .* 0 of the training ranks .*missing: all"):
        check_ranks_started({"attached": [], "world_size": None}, "r")
    with pytest.raises(
        LongActInactive, match=r"3 of 4 training ranks started LongAct \(missing: \[2\]\)"
    ):
        check_ranks_started({"attached": [0, 1, 3], "world_size": 4}, "r")


def test_step_one_must_have_published_masks():
    check_first_step({"version": 1}, {"actor/longact/mask_version": 1.0, "actor/pg_loss": 0}, "r")
    with pytest.raises(LongActInactive, match="mask version 0 .* plain RL"):
        check_first_step({"version": 0}, {"actor/pg_loss": 0.1}, "r")
    with pytest.raises(LongActInactive, match="carry no longact/mask_version"):
        check_first_step({"version": 1}, {"actor/pg_loss": 0.1}, "r")
