"""The sweep's decisions over hand-made cells: standard errors, the Pareto front, budgets met and not met,
ties within noise, and the errors of the sweep's flags."""

import json
import math
from dataclasses import replace

import pytest

from kd_lib.config import ConfigError
from kd_lib.eval.sweep import (
    DOMINATED,
    FRONT,
    WITHIN_NOISE,
    Budget,
    Cell,
    Choice,
    check_grid,
    choose,
    format_table,
    front_status,
    pareto_front,
)
from kd_lib.eval.verdicts import standard_error


def cell(arch="resnet18", ratio=4, top1=(0.8,), baseline=(), val_images=10_000, input_bytes=None, gflops=None,
         latency_ms=None, hr_size=64):
    """A cell at ``hr_size // ratio`` px; costs default to those of the side (bytes 3 px^2)."""
    side = hr_size // ratio
    return Cell(arch, ratio, side, tuple(top1), tuple(baseline), val_images,
                3 * side * side if input_bytes is None else input_bytes,
                0.3 / ratio**2 if gflops is None else gflops, 6.0 / ratio if latency_ms is None else latency_ms)


def one_line_error(error: pytest.ExceptionInfo, flag: str) -> str:
    message = str(error.value)
    assert error.value.field == flag and flag in message and "\n" not in message
    return message


# --- standard errors and gains ---------------------------------------------------------------------------

def test_one_seed_has_the_binomial_standard_error_of_the_val_split():
    c = cell(top1=(0.8,), val_images=400)
    assert c.standard_error == pytest.approx(math.sqrt(0.8 * 0.2 / 400)) == pytest.approx(standard_error(0.8, 400))


def test_several_seeds_have_the_standard_error_of_their_mean():
    # sample std of 0.80, 0.82, 0.84 is 0.02; the val split's size no longer enters
    for n in (100, 100_000):
        c = cell(top1=(0.80, 0.82, 0.84), val_images=n)
        assert c.mean == pytest.approx(0.82)
        assert c.standard_error == pytest.approx(0.02 / math.sqrt(3))


def test_gain_over_the_baseline_and_its_two_standard_errors():
    c = cell(top1=(0.8,), baseline=(0.5, 0.6), val_images=400)
    assert c.gain == pytest.approx(0.25)
    # baseline: sample std of 0.5 and 0.6 is 0.0707, its SE 0.0707 / sqrt(2) = 0.05
    assert c.gain_noise == pytest.approx(2 * math.hypot(0.02, 0.05))
    hr = cell(ratio=1, top1=(0.9,))
    assert hr.gain is None and hr.gain_noise is None


def test_a_cell_survives_json():
    c = cell(top1=(0.8, 0.81), baseline=(0.5,))
    data = json.loads(json.dumps(c.as_dict()))
    assert data["key"] == "resnet18@4" and data["mean"] == pytest.approx(0.805)
    assert Cell.from_dict(data) == c
    with pytest.raises(ValueError, match="no top-1"):
        cell(top1=())


# --- the Pareto front ------------------------------------------------------------------------------------

def test_the_front_of_a_hand_made_set():
    a = cell("a", top1=(0.50,), input_bytes=100)
    b = cell("b", top1=(0.70,), input_bytes=200)
    c = cell("c", top1=(0.65,), input_bytes=300)  # dominated by b: costs more, less accurate
    d = cell("d", top1=(0.90,), input_bytes=400)
    e = cell("e", top1=(0.60,), input_bytes=200)  # dominated by b: same cost, less accurate
    f = cell("f", top1=(0.90,), input_bytes=500)  # dominated by d: same top-1, costs more
    assert [x.arch for x in pareto_front([f, e, d, c, b, a], "input_bytes")] == ["a", "b", "d"]
    # another cost, another front: against GFLOPs, c is the cheapest
    by_gflops = [replace(x, gflops=g) for x, g in zip((a, b, c, d, e, f), (5, 4, 1, 6, 4, 7))]
    assert [x.arch for x in pareto_front(by_gflops, "gflops")] == ["c", "b", "d"]


def test_a_dominated_cell_is_within_noise_only_when_no_front_cell_costing_no_more_beats_it_beyond_noise():
    # 10,000 val images: one SE about 0.0046, two SE of a difference about 0.013
    cheap = cell("cheap", top1=(0.68,), input_bytes=100)
    front = cell("front", top1=(0.75,), input_bytes=200)
    close = cell("close", top1=(0.745,), input_bytes=300)  # 0.5 points under `front`: within noise
    far = cell("far", top1=(0.70,), input_bytes=200)       # 5 points under `front` at the same cost
    mixed = cell("mixed", top1=(0.675,), input_bytes=250)  # within noise of `cheap`, far under `front`
    status = front_status([cheap, front, close, far, mixed], "input_bytes")
    assert status == {"cheap@4": FRONT, "front@4": FRONT, "close@4": WITHIN_NOISE, "far@4": DOMINATED,
                      "mixed@4": DOMINATED}


# --- budgets ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("budget", "flag"), [
    (Budget(keep=1.5), "--keep"),
    (Budget(keep=0.0), "--keep"),
    (Budget(max_bytes=0), "--max-bytes"),
    (Budget(max_gflops=-1.0), "--max-gflops"),
    (Budget(max_latency_ms=0.0), "--max-latency-ms"),
    (Budget(cost="watts"), "--cost"),
])
def test_a_bad_budget_is_a_one_line_error_naming_its_flag(budget, flag):
    with pytest.raises(ConfigError) as error:
        budget.validate()
    one_line_error(error, flag)


def test_keep_over_one_says_it_is_a_fraction():
    with pytest.raises(ConfigError) as error:
        Budget(keep=1.5).validate()
    assert "(0, 1]" in one_line_error(error, "--keep") and "1.5" in str(error.value)
    Budget(keep=1.0, max_bytes=768, max_gflops=0.1, max_latency_ms=2.0, cost="latency_ms").validate()


def grid(reference=0.9):
    """A resnet18 sweep on 10,000 val images; reference 0.9, so keep 0.9 is a target of 0.81."""
    return [cell(ratio=1, top1=(reference,)), cell(ratio=2, top1=(0.88,)), cell(ratio=4, top1=(0.85,)),
            cell(ratio=8, top1=(0.70,))]


def test_keep_chooses_the_cheapest_cell_that_surely_reaches_the_target():
    choice = choose(grid(), 0.9, 0.003, Budget(keep=0.9))
    assert choice.met and choice.cell.key == "resnet18@4" and choice.certainty == "sure"
    assert choice.target == pytest.approx(0.81) and choice.alternatives == () and choice.closest is None
    for text in ("resnet18", "ratio 4", "16 px", "768 input bytes", "0.019 GFLOPs", "85.00 ± 0.36 %", "81.00 %",
                 "by more than two SE"):
        assert text in choice.message
    assert choice.message.count(". ") <= 1


@pytest.mark.parametrize("top1", [0.812, 0.808])
def test_a_cell_within_noise_of_the_target_is_chosen_and_says_so(top1):
    # 2 SE of the margin: 2 sqrt(0.0039^2 + (0.9 * 0.003)^2), about 0.0095, either side of 0.81
    cells = [*grid(), cell(ratio=4, arch="mobilenet_v3_small", top1=(top1,), gflops=0.002)]
    cells = [c for c in cells if c.key != "resnet18@4"]
    choice = choose(cells, 0.9, 0.003, Budget(keep=0.9))
    assert choice.met and choice.cell.key == "mobilenet_v3_small@4" and choice.certainty == "within noise"
    assert "within noise" in choice.message


def test_seeds_make_a_margin_sure_that_one_seed_leaves_within_noise():
    one = cell(top1=(0.812,), val_images=1000)
    three = cell(top1=(0.811, 0.812, 0.813), val_images=1000)
    assert choose([one], 0.9, 0.0, Budget(keep=0.9)).certainty == "within noise"
    assert choose([three], 0.9, 0.0, Budget(keep=0.9)).certainty == "sure"


def test_the_cost_budget_is_met_exactly_and_cost_says_what_cheapest_means():
    cells = grid()
    assert choose(cells, 0.9, 0.003, Budget(keep=0.9, max_bytes=767)).met is False
    assert choose(cells, 0.9, 0.003, Budget(keep=0.9, max_bytes=768)).cell.key == "resnet18@4"
    slow_small = cell("mobilenet_v3_small", ratio=4, top1=(0.86,), gflops=0.002, latency_ms=9.0)
    by_gflops = choose([*cells, slow_small], 0.9, 0.003, Budget(keep=0.9, cost="gflops"))
    by_latency = choose([*cells, slow_small], 0.9, 0.003, Budget(keep=0.9, cost="latency_ms"))
    assert by_gflops.cell.key == "mobilenet_v3_small@4" and "by GFLOPs" in by_gflops.message
    assert by_latency.cell.key == "resnet18@4"


def test_without_keep_the_most_accurate_cell_in_budget_is_chosen():
    choice = choose(grid(), 0.9, 0.003, Budget(max_bytes=3072))
    assert choice.met and choice.cell.key == "resnet18@2" and choice.certainty == "sure" and choice.target is None
    assert choose(grid(), 0.9, 0.003, Budget()).cell.key == "resnet18@1"


def test_cells_within_noise_of_the_choice_are_alternatives_not_ranked():
    # 1,000 val images: 2 SE of a difference about 0.035; 0.80 and 0.81 are a tie
    small = cell("mobilenet_v3_small", top1=(0.80,), gflops=0.002, val_images=1000)
    large = cell("resnet18", top1=(0.81,), gflops=0.019, val_images=1000)
    hr = cell("resnet18", ratio=1, top1=(0.95,), val_images=1000)
    choice = choose([hr, large, small], 0.95, 0.007, Budget(max_bytes=768))
    assert choice.cell is large and choice.alternatives == (small,) and choice.certainty == "within noise"
    assert "Within noise of it, not ranked: mobilenet_v3_small@4." in choice.message
    # with keep both reach 0.8 * 0.95 = 0.76; the tie on bytes goes to fewer GFLOPs, the other stays listed
    keep = choose([hr, large, small], 0.95, 0.007, Budget(keep=0.8))
    assert keep.cell is small and keep.alternatives == (large,)
    # on 100,000 images the same difference is beyond noise: no alternative, no doubt
    sure = choose([cell(top1=(0.81,), val_images=100_000),
                   cell("mobilenet_v3_small", top1=(0.80,), gflops=0.002, val_images=100_000)],
                  0.95, 0.007, Budget(max_bytes=768))
    assert sure.cell.arch == "resnet18" and sure.alternatives == () and sure.certainty == "sure"


def test_when_nothing_meets_the_budget_the_closest_is_named_not_chosen():
    cells = grid()
    # cells within the cost limits but none reaching 0.99 * 0.9: the most accurate of them
    short = choose(cells, 0.9, 0.003, Budget(keep=0.99, max_bytes=768))
    assert not short.met and short.cell is None and short.certainty is None
    assert short.closest.key == "resnet18@4" and short.message.startswith("No cell meets the budget")
    assert "ratio 4" in short.message and "points under the target" in short.message
    # nothing within the cost limits: the smallest overrun among the cells reaching the target
    over = choose(cells, 0.9, 0.003, Budget(keep=0.9, max_bytes=100))
    assert over.closest.key == "resnet18@4" and "7.68 times its most exceeded limit" in over.message
    # nothing within the cost limits, nothing reaching the target: the most accurate
    neither = choose(cells, 1.0, 0.0, Budget(keep=0.99, max_bytes=100))
    assert neither.closest.key == "resnet18@1" and not neither.met
    assert "none is within the cost limits" in neither.message


def test_choose_validates_its_budget_and_needs_cells():
    with pytest.raises(ConfigError):
        choose(grid(), 0.9, 0.003, Budget(keep=1.5))
    with pytest.raises(ValueError, match="no cells"):
        choose([], 0.9, 0.003, Budget())


def test_a_choice_survives_json():
    cells = grid()
    for budget in (Budget(keep=0.9), Budget(keep=0.99, max_bytes=768)):
        choice = choose(cells, 0.9, 0.003, budget)
        assert Choice.from_dict(json.loads(json.dumps(choice.as_dict())), cells) == choice


def test_the_table_has_a_row_per_cell_by_arch_then_ratio_and_marks_the_choice():
    cells = [cell("resnet18", 2, (0.88,), (0.80,)), cell("mobilenet_v3_small", 4, (0.78,), (0.6,), gflops=0.002),
             *[c for c in grid() if c.ratio != 2]]
    choice = choose(cells, 0.9, 0.003, Budget(keep=0.9))
    lines = format_table(cells, 0.9, choice).splitlines()
    rows = lines[2:2 + len(cells)]
    assert [r.split()[:2] for r in rows] == [["mobilenet_v3_small", "4"], ["resnet18", "1"], ["resnet18", "2"],
                                             ["resnet18", "4"], ["resnet18", "8"]]
    assert rows[3].split()[-2:] == ["front", "chosen"] and sum("chosen" in r for r in rows) == 1
    assert "+8.00 ± " in rows[2] and rows[1].split()[8] == "-"  # the gain, and none at ratio 1
    assert rows[0].split()[-1] == "dominated" and "12,288" in rows[1]
    assert lines[-1] == choice.message


# --- the grid's flags ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("ratios", "archs", "flag", "says"), [
    ([], ["resnet18"], "--ratios", "empty"),
    ([2, 4, 2], ["resnet18"], "--ratios", "repeats 2"),
    ([0], ["resnet18"], "--ratios", "under 1"),
    ([3], ["resnet18"], "--ratios", "does not divide hr_size 64"),
    ([16], ["resnet18"], "--ratios", "leaves 4 px"),
    ([4], [], "--student-archs", "empty"),
    ([4], ["resnet18", "resnet18"], "--student-archs", "repeats resnet18"),
    ([4], ["resnet9000"], "--student-archs", "unknown torchvision architecture 'resnet9000'"),
    ([4], ["timm:no_such_model"], "--student-archs", "unknown timm model"),
])
def test_a_bad_grid_is_a_one_line_error_naming_its_flag(ratios, archs, flag, says):
    with pytest.raises(ConfigError) as error:
        check_grid(ratios, 64, archs)
    assert says in one_line_error(error, flag)


def test_a_good_grid_passes():
    check_grid([1, 2, 4, 8], 64, ["resnet18", "mobilenet_v3_small", "timm:resnet10t"])
    check_grid([16], 64, ["resnet18"], min_side=4)
