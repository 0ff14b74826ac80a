import pytest

from persona_em.errors import UserError
from persona_em.training.schedule import expand_schedule, steps_per_epoch


def test_steps_per_epoch_counts_the_last_partial_batch():
    assert steps_per_epoch(32, 16) == 2
    assert steps_per_epoch(33, 16) == 3


def test_every_n_includes_step0_and_final():
    assert expand_schedule({"every": 4}, steps_per_epoch=5, epochs=2) == [0, 4, 8, 10]


def test_explicit_list_with_final():
    assert expand_schedule({"steps": [100, 0, "final", 200]}, steps_per_epoch=313, epochs=1) == [0, 100, 200, 313]


def test_cs2881_schedule_on_the_medical_data():
    # 7040 rows / effective batch 16 = 440 steps per epoch, 3 epochs.
    assert expand_schedule({"first_epoch_points": 4}, 440, 3) == [0, 110, 220, 330, 440, 880, 1320]
    assert expand_schedule({"first_epoch_points": 4, "include_step0": False}, 440, 3)[0] == 110


def test_checkpoint_beyond_the_last_step_is_a_user_error_naming_the_step():
    with pytest.raises(UserError, match="step 500 is beyond the run's last step 313"):
        expand_schedule({"steps": [0, 500]}, steps_per_epoch=313, epochs=1)
