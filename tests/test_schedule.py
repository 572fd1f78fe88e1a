"""The learning-rate schedule: cosine or step, after an optional linear warm-up."""

import pytest
import torch

from kd_lib.engine.loop import WARMUP_FACTOR, build_scheduler
from kd_lib.engine.settings import TrainSettings


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_the_warm_up_ramps_the_rate_from_a_thousandth_then_hands_over_to_the_schedule(schedule):
    settings = TrainSettings(epochs=4, lr=0.1, schedule=schedule, milestones=[2] if schedule == "step" else [],
                             warmup_steps=5)
    plain = TrainSettings(epochs=4, lr=0.1, schedule=schedule, milestones=settings.milestones)
    rates = {}
    for name, chosen in (("warm", settings), ("plain", plain)):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=chosen.lr)
        scheduler = build_scheduler(optimizer, chosen, steps_per_epoch=10)
        rates[name] = []
        for _ in range(40):
            rates[name].append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
    assert rates["warm"][0] == pytest.approx(0.1 * WARMUP_FACTOR)
    assert all(a < b for a, b in zip(rates["warm"][:5], rates["warm"][1:6]))  # rising through the warm-up
    assert rates["warm"][2] < rates["plain"][2] / 2
    assert rates["warm"][5:] == pytest.approx(rates["plain"][5:])  # the schedule itself, unchanged
