"""The loop's pure parts: the step clock behind img/s."""

from __future__ import annotations

from dcgan_dist.loop import StepClock


class FakeClock:
    """A clock the test moves by hand, so the assertions are exact."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_img_per_s_leaves_out_the_grid_evaluation_and_checkpoint_work():
    clock = FakeClock()
    steps = StepClock(clock)
    clock.now += 2.0  # two seconds of steps
    with steps.side_work(window_closed=False):
        clock.now += 30.0  # an evaluation in the middle of a window
    clock.now += 1.0
    assert steps.window_seconds() == 3.0
    with steps.side_work(window_closed=True):  # the window closed at this step; a checkpoint follows
        clock.now += 50.0
    clock.now += 0.5
    assert steps.window_seconds() == 0.5  # the next window is not charged the checkpoint
    assert clock.now - steps.run_start == 83.5  # the progress bar's elapsed time is wall time
