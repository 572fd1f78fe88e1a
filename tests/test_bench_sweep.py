"""bench/sweep.py: the seeds of each cell pooled into one cell, and the answer on the pooled cells."""

import pytest

from kd_lib.eval.sweep import Cell


def summary(reference, cells):
    return {"reference_top1": reference, "dataset": {"val_images": 500},
            "cells": [Cell("resnet18", ratio, 64 // ratio, (top1,), (base,) if base else (), 500,
                           3 * (64 // ratio) ** 2, 0.5 / ratio ** 2, 1.0).as_dict() for ratio, top1, base in cells]}


def test_the_seeds_of_a_cell_pool_into_one_cell(bench_module):
    bench = bench_module("sweep")
    cells, reference, se = bench.pooled([summary(0.8, [(1, 0.8, None), (4, 0.6, 0.5)]),
                                         summary(0.7, [(1, 0.7, None), (4, 0.7, 0.4)])])
    cells = {cell.key: cell for cell in cells}
    assert cells["resnet18@4"].top1 == (0.6, 0.7) and cells["resnet18@4"].baseline_top1 == (0.5, 0.4)
    assert cells["resnet18@4"].mean == pytest.approx(0.65) and cells["resnet18@4"].gain == pytest.approx(0.2)
    assert cells["resnet18@1"].baseline_top1 == () and reference == pytest.approx(0.75)
    assert se == pytest.approx((0.75 * 0.25 / 500) ** 0.5 / 2 ** 0.5)
