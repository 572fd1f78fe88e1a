"""Decisions over a resolution/model sweep: which (student architecture, ratio) cell to ship.

``kdp sweep`` trains, for each student architecture and ratio (a *cell*), a
distilled student at ``hr_size // ratio`` px and its LR baseline (the same
architecture at the same size, cross-entropy only); ratio 1 is the HR
assistant itself and has no LR baseline. Each cell carries its top-1 (one
fraction per seed) and its deployment costs (:data:`COSTS`).

Noise. A cell's top-1 is the mean over its seeds; its standard error (SE) is
that of a mean, ``s / sqrt(k)`` with ``s`` the sample standard deviation of
the ``k >= 2`` seeds (Bessel-corrected); with one seed it is the binomial SE
of the val split, ``sqrt(p (1 - p) / n)`` (:func:`kd_lib.eval.verdicts.standard_error`).
Two top-1 differ "within noise" when their difference is at most two SE of
the difference, ``2 sqrt(se_a^2 + se_b^2)`` (errors taken as independent, as
in :mod:`kd_lib.eval.verdicts`); cells within noise of each other are never
ranked against each other.

Costs are measured, not estimated, so a cost budget is met or not, exactly.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from kd_lib.config import check
from kd_lib.eval.verdicts import standard_error
from kd_lib.models import check_architecture

#: Each cell's deployment costs, lower is better: bytes of one 8-bit input image, forward GFLOPs, and
#: latency in ms at batch 1.
COSTS = ("input_bytes", "gflops", "latency_ms")
COST_NAMES = {"input_bytes": "input bytes", "gflops": "GFLOPs", "latency_ms": "latency at batch 1"}
FRONT, WITHIN_NOISE, DOMINATED = "front", "within noise of the front", "dominated"
Certainty = Literal["sure", "within noise", "misses"]


def _mean_standard_error(values: Sequence[float], val_images: int) -> float:
    """SE of the mean of ``values``: ``s / sqrt(k)`` over ``k >= 2`` seeds, the binomial SE with one
    (module docstring)."""
    if len(values) == 1:
        return standard_error(values[0], val_images)
    return statistics.stdev(values) / math.sqrt(len(values))


@dataclass(frozen=True)
class Cell:
    """One trained (architecture, ratio): top-1 fractions per seed, its LR baseline's per seed (empty at
    ratio 1), the val split's size and the costs of one forward at ``input_size``."""

    arch: str
    ratio: int
    input_size: int
    top1: tuple[float, ...]
    baseline_top1: tuple[float, ...]
    val_images: int
    input_bytes: int
    gflops: float
    latency_ms: float

    def __post_init__(self) -> None:
        if not self.top1:
            raise ValueError(f"cell {self.arch}@{self.ratio} has no top-1: give one per seed")

    @property
    def key(self) -> str:
        """``"arch@ratio"``, e.g. ``"resnet18@4"``."""
        return f"{self.arch}@{self.ratio}"

    @property
    def mean(self) -> float:
        return statistics.fmean(self.top1)

    @property
    def standard_error(self) -> float:
        """SE of :attr:`mean`: ``s / sqrt(k)`` over ``k >= 2`` seeds, ``sqrt(p (1 - p) / n)`` with one."""
        return _mean_standard_error(self.top1, self.val_images)

    @property
    def gain(self) -> float | None:
        """Mean top-1 over the LR baseline's (a fraction); None without a baseline."""
        return self.mean - statistics.fmean(self.baseline_top1) if self.baseline_top1 else None

    @property
    def gain_noise(self) -> float | None:
        """Two SE of :attr:`gain`: ``2 sqrt(se^2 + se_baseline^2)``; None without a baseline."""
        if not self.baseline_top1:
            return None
        return 2 * math.hypot(self.standard_error, _mean_standard_error(self.baseline_top1, self.val_images))

    def cost(self, name: str) -> float:
        """The cost ``name``, one of :data:`COSTS`."""
        if name not in COSTS:
            raise ValueError(f"unknown cost {name!r}; expected one of {', '.join(COSTS)}")
        return getattr(self, name)

    def as_dict(self) -> dict[str, Any]:
        """The fields, with the derived ``key``, ``mean``, ``standard_error``, ``gain`` and ``gain_noise``."""
        derived = ("key", "mean", "standard_error", "gain", "gain_noise")
        return {**asdict(self), **{name: getattr(self, name) for name in derived}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cell:
        """The cell of :meth:`as_dict` (derived keys are ignored)."""
        values = {f.name: data[f.name] for f in fields(cls)}
        return cls(**{**values, "top1": tuple(values["top1"]), "baseline_top1": tuple(values["baseline_top1"])})


def noise(a: Cell, b: Cell) -> float:
    """Two SE of ``a.mean - b.mean``: ``2 sqrt(se_a^2 + se_b^2)``."""
    return 2 * math.hypot(a.standard_error, b.standard_error)


def dominates(a: Cell, b: Cell, cost: str) -> bool:
    """Pareto dominance: ``a`` is at least as accurate and at most as costly as ``b``, and strictly
    better in one of the two."""
    at_least = a.mean >= b.mean and a.cost(cost) <= b.cost(cost)
    return at_least and (a.mean > b.mean or a.cost(cost) < b.cost(cost))


def pareto_front(cells: Sequence[Cell], cost: str) -> list[Cell]:
    """The cells no other cell dominates (:func:`dominates`), by ``cost`` then higher top-1."""
    front = [c for c in cells if not any(dominates(other, c, cost) for other in cells)]
    return sorted(front, key=lambda c: (c.cost(cost), -c.mean))


def front_status(cells: Sequence[Cell], cost: str) -> dict[str, str]:
    """Each cell's key -> :data:`FRONT`; :data:`WITHIN_NOISE` for a dominated cell that no front cell
    costing no more beats by more than two SE (:func:`noise`), so that it may be on the front; else
    :data:`DOMINATED`."""
    front = pareto_front(cells, cost)

    def status(cell: Cell) -> str:
        if cell in front:
            return FRONT
        cheaper = [f for f in front if f.cost(cost) <= cell.cost(cost)]
        return WITHIN_NOISE if all(f.mean - cell.mean <= noise(f, cell) for f in cheaper) else DOMINATED

    return {cell.key: status(cell) for cell in cells}


@dataclass
class Budget:
    """What the chosen cell must meet: keep a fraction of the reference top-1 and stay under cost limits
    (None: no limit); ``cost`` (one of :data:`COSTS`) says what "cheapest" means."""

    keep: float | None = None
    max_bytes: int | None = None
    max_gflops: float | None = None
    max_latency_ms: float | None = None
    cost: str = "input_bytes"

    def limits(self) -> dict[str, tuple[str, float]]:
        """Each cost with a limit -> ``(flag, limit)``."""
        given = {"input_bytes": ("--max-bytes", self.max_bytes), "gflops": ("--max-gflops", self.max_gflops),
                 "latency_ms": ("--max-latency-ms", self.max_latency_ms)}
        return {cost: (flag, limit) for cost, (flag, limit) in given.items() if limit is not None}

    def validate(self) -> None:
        """:class:`~kd_lib.config.ConfigError` naming the flag of a bad value."""
        check(self.keep is None or 0 < self.keep <= 1, "--keep",
              f"must be a fraction of the reference top-1 in (0, 1], e.g. 0.95 to keep 95 %, got {self.keep}")
        for flag, limit in self.limits().values():
            check(limit > 0, flag, f"must be positive, got {limit}")
        check(self.cost in COSTS, "--cost", f"must be one of {', '.join(COSTS)}, got {self.cost!r}")

    def meets_costs(self, cell: Cell) -> bool:
        return all(cell.cost(cost) <= limit for cost, (_, limit) in self.limits().items())

    def overrun(self, cell: Cell) -> float:
        """Relative overrun of the worst cost limit, ``max_k cost_k / limit_k - 1`` (at most 0 within them)."""
        return max((cell.cost(cost) / limit - 1 for cost, (_, limit) in self.limits().items()), default=0.0)


def keep_status(cell: Cell, target: float, target_se: float) -> Certainty:
    """Does ``cell`` reach the top-1 ``target``? ``"sure"`` when its mean clears it by more than two SE
    (``2 sqrt(se_cell^2 + target_se^2)``), ``"misses"`` when under it by more, else ``"within noise"``."""
    margin, two_se = cell.mean - target, 2 * math.hypot(cell.standard_error, target_se)
    if margin > two_se:
        return "sure"
    return "misses" if margin < -two_se else "within noise"


def _cheapness(cost: str):
    """Sort key: ``cost``, then the other costs in :data:`COSTS` order, then higher top-1."""
    return lambda c: (c.cost(cost), *(c.cost(other) for other in COSTS if other != cost), -c.mean)


@dataclass(frozen=True)
class Choice:
    """The chosen cell (None when none meets the budget, :attr:`closest` then names the nearest), how sure
    (``"sure"`` or ``"within noise"``; None when not met), the message, the cells within noise of the
    chosen one (not ranked), and the top-1 target (a fraction; None without ``keep``)."""

    cell: Cell | None
    met: bool
    certainty: Certainty | None
    message: str
    alternatives: tuple[Cell, ...] = ()
    closest: Cell | None = None
    target: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON form: cells by key (see :meth:`from_dict`)."""
        return {"cell": self.cell and self.cell.key, "met": self.met, "certainty": self.certainty,
                "message": self.message, "alternatives": [c.key for c in self.alternatives],
                "closest": self.closest and self.closest.key, "target": self.target}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], cells: Sequence[Cell]) -> Choice:
        """The choice of :meth:`as_dict`, its keys looked up in ``cells``."""
        by_key = {c.key: c for c in cells}
        return cls(by_key.get(data["cell"]), data["met"], data["certainty"], data["message"],
                   tuple(by_key[k] for k in data["alternatives"]), by_key.get(data["closest"]), data["target"])

    def marks(self) -> dict[str, str]:
        """Cell key -> its role in the choice, for tables and figures."""
        marks = {c.key: "within noise of chosen" for c in self.alternatives}
        if self.closest is not None:
            marks[self.closest.key] = "closest (budget not met)"
        if self.cell is not None:
            marks[self.cell.key] = "chosen"
        return marks


def describe(cell: Cell) -> str:
    """``resnet18 at ratio 4 (16 px, 768 input bytes, 0.031 GFLOPs), top-1 83.75 ± 1.20 %``."""
    return (f"{cell.arch} at ratio {cell.ratio} ({cell.input_size} px, {cell.input_bytes:,} input bytes, "
            f"{cell.gflops:.3f} GFLOPs), top-1 {100 * cell.mean:.2f} ± {100 * cell.standard_error:.2f} %")


def _budget_text(budget: Budget, reference_top1: float) -> str:
    """``top-1 at least 0.95 of the reference 97.08 % = 92.23 %, --max-bytes 768``."""
    parts = [f"{flag} {limit:g}" for flag, limit in budget.limits().values()]
    if budget.keep is not None:
        target = budget.keep * reference_top1
        parts.insert(0, f"top-1 at least {budget.keep:g} of the reference {100 * reference_top1:.2f} % "
                        f"= {100 * target:.2f} %")
    return ", ".join(parts) or "no budget"


def _closest(cells: Sequence[Cell], budget: Budget, keeps: dict[str, Certainty], target: float | None
             ) -> tuple[Cell, str]:
    """The cell nearest to a budget no cell meets, and why: among the cells within the cost limits, the
    most accurate (the smallest shortfall from the target); else, among the cells that reach the target
    (every cell without ``keep``), the smallest relative overrun (:meth:`Budget.overrun`); else the most
    accurate cell. Ties go to the cheaper (:func:`_cheapness`)."""
    cheap = _cheapness(budget.cost)

    def accurate(c: Cell) -> tuple:
        return (-c.mean, *cheap(c))

    within = [c for c in cells if budget.meets_costs(c)]
    if within:  # then keep is given: without it every cell within the cost limits is eligible
        best = min(within, key=accurate)
        return best, (f"the most accurate within the cost limits, {100 * (target - best.mean):.2f} points "
                      f"under the target top-1")
    reaching = [c for c in cells if keeps[c.key] != "misses"]
    if reaching:
        best = min(reaching, key=lambda c: (budget.overrun(c), *cheap(c)))
        return best, f"the smallest cost overrun, {1 + budget.overrun(best):.3g} times its most exceeded limit"
    return min(cells, key=accurate), ("the most accurate cell; none reaches the target top-1 and none is within "
                                      "the cost limits")


def choose(cells: Sequence[Cell], reference_top1: float, reference_se: float, budget: Budget) -> Choice:
    """The cell to ship under ``budget``; ``reference_top1`` (SE ``reference_se``) is the best HR model's.

    A cell is eligible when it is within the cost limits and, with ``keep``, its :func:`keep_status`
    against the target ``keep * reference_top1`` (SE ``keep * reference_se``) is not ``"misses"``.
    With ``keep`` the choice is the cheapest eligible cell (:func:`_cheapness` by ``budget.cost``), its
    certainty that status; without, the most accurate, ``"within noise"`` when an eligible cell costing no
    more is within noise of it. Either way the alternatives are the other eligible cells costing no more
    whose top-1 is within noise of the chosen one's, not ranked. When no cell is eligible the choice is
    not met and names the closest (:func:`_closest`).
    """
    if not cells:
        raise ValueError("the sweep has no cells to choose from")
    budget.validate()
    target = None if budget.keep is None else budget.keep * reference_top1
    # without keep there is no target to miss
    keeps = {c.key: "sure" if target is None else keep_status(c, target, budget.keep * reference_se)
             for c in cells}
    eligible = [c for c in cells if budget.meets_costs(c) and keeps[c.key] != "misses"]
    what = _budget_text(budget, reference_top1)
    if not eligible:
        closest, why = _closest(cells, budget, keeps, target)
        return Choice(None, False, None, f"No cell meets the budget ({what}). The closest is {describe(closest)}: "
                      f"{why}.", closest=closest, target=target)
    cheap = _cheapness(budget.cost)
    chosen = min(eligible, key=cheap) if target is not None else min(eligible, key=lambda c: (-c.mean, *cheap(c)))
    ties = (c for c in eligible if c is not chosen and c.cost(budget.cost) <= chosen.cost(budget.cost)
            and abs(c.mean - chosen.mean) <= noise(c, chosen))
    alternatives = tuple(sorted(ties, key=cheap))
    if target is not None:
        certainty = keeps[chosen.key]
        how = "by more than two SE" if certainty == "sure" else "within noise (two SE)"
        message = (f"Chosen: {describe(chosen)}: the cheapest by {COST_NAMES[budget.cost]} of the cells meeting "
                   f"the budget ({what}), reaching the target top-1 {how}.")
    else:
        certainty = "within noise" if alternatives else "sure"
        message = f"Chosen: {describe(chosen)}: the most accurate of the cells meeting the budget ({what})."
    if alternatives:
        message += f" Within noise of it, not ranked: {', '.join(c.key for c in alternatives)}."
    return Choice(chosen, True, certainty, message, alternatives, target=target)


def check_grid(ratios: Sequence[int], hr_size: int, archs: Sequence[str], min_side: int = 8) -> None:
    """:class:`~kd_lib.config.ConfigError` for ``--ratios`` or ``--student-archs`` unless the grid is
    usable: neither empty nor repeating, each ratio at least 1, dividing ``hr_size`` and leaving an
    input side of at least ``min_side`` px, each architecture one
    :func:`kd_lib.models.check_architecture` takes (torchvision or ``timm:`` names)."""
    for flag, values, what in (("--ratios", ratios, "ratio"), ("--student-archs", archs, "architecture")):
        check(len(values) > 0, flag, f"is empty: give at least one {what}")
        repeated = sorted({v for v in values if list(values).count(v) > 1}, key=str)
        check(not repeated, flag, f"repeats {', '.join(map(str, repeated))}")
    usable = [r for r in range(1, hr_size // min_side + 1) if hr_size % r == 0]
    for ratio in ratios:
        check(ratio >= 1, "--ratios", f"ratio {ratio} is under 1 (the input side is hr_size // ratio)")
        check(hr_size % ratio == 0, "--ratios", f"ratio {ratio} does not divide hr_size {hr_size}; "
              f"usable ratios: {' '.join(map(str, usable))}")
        check(hr_size // ratio >= min_side, "--ratios", f"ratio {ratio} leaves {hr_size // ratio} px of "
              f"hr_size {hr_size}, under {min_side} px; usable ratios: {' '.join(map(str, usable))}")
    for arch in archs:
        check_architecture(arch, "--student-archs")


def table_rows(cells: Sequence[Cell], reference_top1: float, choice: Choice
               ) -> tuple[list[str], list[bool], list[list[str]]]:
    """``(headers, numeric, rows)``: one row of formatted cells per cell, by arch then ratio; top-1 in %
    with its SE, the gain over the LR baseline in points with two SE, the front status by input bytes."""
    status, marks = front_status(cells, "input_bytes"), choice.marks()

    def gain(c: Cell) -> str:
        return "-" if c.gain is None else f"{100 * c.gain:+.2f} ± {100 * c.gain_noise:.2f}"

    columns = [
        ("arch", False, lambda c: c.arch),
        ("ratio", True, lambda c: str(c.ratio)),
        ("input px", True, lambda c: str(c.input_size)),
        ("seeds", True, lambda c: str(len(c.top1))),
        ("top-1 % ± SE", True, lambda c: f"{100 * c.mean:.2f} ± {100 * c.standard_error:.2f}"),
        ("of ref %", True, lambda c: f"{100 * c.mean / reference_top1:.1f}"),
        ("gain pts ± 2 SE", True, gain),
        ("input bytes", True, lambda c: f"{c.input_bytes:,}"),
        ("GFLOPs", True, lambda c: f"{c.gflops:.3f}"),
        ("lat b1 ms", True, lambda c: f"{c.latency_ms:.2f}"),
        ("front (bytes)", False, lambda c: status[c.key]),
        ("choice", False, lambda c: marks.get(c.key, "")),
    ]
    ordered = sorted(cells, key=lambda c: (c.arch, c.ratio))
    return ([h for h, _, _ in columns], [n for _, n, _ in columns],
            [[text(c) for _, _, text in columns] for c in ordered])


def format_table(cells: Sequence[Cell], reference_top1: float, choice: Choice) -> str:
    """Plain-text table of :func:`table_rows` (numbers right-aligned), then the choice's message."""
    headers, numeric, rows = table_rows(cells, reference_top1, choice)
    widths = [max(len(text) for text in column) for column in zip(headers, *rows)]

    def line(texts: list[str]) -> str:
        return "  ".join(t.rjust(w) if n else t.ljust(w) for t, w, n in zip(texts, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows), "", choice.message])


def sweep_summary(cells: Sequence[Cell], reference_top1: float, reference_se: float, budget: Budget,
                  choice: Choice) -> dict[str, Any]:
    """The sweep's ``summary.json``: ``{"reference_top1", "reference_se", "budget", "cells", "choice"}``,
    read back by :func:`kd_lib.eval.sweep_report.sweep_html`."""
    return {"reference_top1": reference_top1, "reference_se": reference_se, "budget": asdict(budget),
            "cells": [c.as_dict() for c in cells], "choice": choice.as_dict()}
