"""Data-parallel training: batch sharding, the collectives that keep replicas identical, and a
training stage under ``torchrun`` on two CPU processes (gloo)."""

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
from torch import nn

from kd_lib.data.sampler import EpochBatchSampler
from kd_lib.engine import distributed
from kd_lib.io.manifest import read_manifest
from kd_lib.losses import AdversarialLoss

ROOT = Path(__file__).resolve().parents[1]
DIGEST = re.compile(r"teacher: rank (\d)/2 final parameter digest ([0-9a-f]{64})")
STEPS = 2 * (72 // 8)  # two epochs of the prepared fixture's 72 training images, batch 8


def test_processes_read_disjoint_slices_of_the_same_batches():
    whole = list(EpochBatchSampler(50, 8, seed=3, epoch=1))
    shards = [list(EpochBatchSampler(50, 8, seed=3, epoch=1, rank=r, world_size=2)) for r in range(2)]
    assert [len(s) for s in shards] == [len(whole), len(whole)] == [6, 6]
    for batch, (first, second) in enumerate(zip(*shards)):
        assert len(first) == len(second) == 4
        assert first + second == whole[batch]  # disjoint, and together the single-process batch
    indices = [i for shard in shards for batch in shard for i, _ in batch]
    assert len(indices) == len(set(indices)) == 48
    assert list(EpochBatchSampler(50, 8, seed=3, epoch=1, rank=1, world_size=2)) == shards[1]
    assert list(EpochBatchSampler(50, 8, seed=3, epoch=1, start_batch=4, rank=1, world_size=2)) == shards[1][4:]


def test_a_batch_that_does_not_split_is_refused():
    with pytest.raises(ValueError, match="batch_size 6 must split evenly over 4 processes"):
        EpochBatchSampler(50, 6, seed=0, epoch=0, rank=0, world_size=4)


def _replica(rank: int, store: str, results: str) -> None:
    """One of two gloo processes: different initial weights and data on purpose, then the helpers."""
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    torch.manual_seed(rank)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    branch, unused = nn.Linear(2, 2), nn.Linear(2, 2)  # a gradient on rank 1 only; none anywhere
    adversary = AdversarialLoss(2, hidden=4)
    for module in (model, branch, unused, adversary):
        distributed.broadcast_state(module)
    x = torch.randn(6, 4)
    loss = model(x).sum() + (branch(x[:, :2]).sum() if rank == 1 else 0)
    loss.backward()
    params = [*model.parameters(), *branch.parameters(), *unused.parameters()]
    local = [None if p.grad is None else p.grad.clone() for p in params]
    distributed.average_gradients(params)
    distributed.broadcast_buffers(model)
    adversary.discriminator_step(torch.randn(5, 2), torch.randn(5, 2))
    torch.save({"local": local, "averaged": [p.grad for p in params],
                "digests": [distributed.parameters_digest(m) for m in (model, adversary)],
                "signal": distributed.agreed_signal(signal.SIGTERM if rank == 1 else None),
                "mean": [v.item() for v in distributed.mean_over_processes([torch.tensor(float(rank)),
                                                                            torch.tensor(2.0)])]},
               f"{results}/{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_collectives_keep_two_replicas_identical(tmp_path):
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_replica, args=(rank, str(tmp_path / "store"), str(tmp_path)))
                 for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0]
    first, second = (torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2))
    assert first["digests"] == second["digests"]  # parameters, BatchNorm statistics, discriminator
    for a, b, mine, theirs in zip(first["averaged"], second["averaged"], first["local"], second["local"]):
        if mine is None and theirs is None:
            assert a is None and b is None  # no gradient anywhere: the optimizer skips it
            continue
        zero = torch.zeros_like(theirs if mine is None else mine)
        expected = ((zero if mine is None else mine) + (zero if theirs is None else theirs)) / 2
        torch.testing.assert_close(a, expected)
        assert torch.equal(a, b)
    assert first["signal"] == second["signal"] == signal.SIGTERM
    assert first["mean"] == second["mean"] == [0.5, 2.0]


def teacher_under_torchrun(data: str, out: Path, *extra: str) -> subprocess.Popen:
    """``torchrun`` with two CPU processes training the teacher stage for two epochs."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "components.teacher", "--data", data, "--out", str(out), "--arch", "resnet18", "--epochs", "2",
               "--batch-size", "8", "--hr-size", "32", "--ratio", "4", "--device", "cpu", "--num-workers", "0",
               *extra]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stderr=subprocess.PIPE, text=True)


def final_digests(stderr: str) -> dict[str, str]:
    """Each rank's final parameter digest, by rank."""
    return dict(DIGEST.findall(stderr))


@pytest.fixture(scope="module")
def ddp_teacher(prepared, tmp_path_factory) -> tuple[Path, int, str]:
    out = tmp_path_factory.mktemp("ddp") / "teacher"
    process = teacher_under_torchrun(prepared, out)
    _, stderr = process.communicate(timeout=300)
    return out, process.returncode, stderr


@pytest.mark.slow
def test_torchrun_stage_trains_identical_replicas_and_publishes_once(ddp_teacher):
    out, returncode, stderr = ddp_teacher
    assert returncode == 0, stderr
    digests = final_digests(stderr)
    assert sorted(digests) == ["0", "1"] and digests["0"] == digests["1"], stderr
    manifest = read_manifest(str(out))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(
        ["manifest.json", *manifest["paths"].values()])
    assert manifest["final"]["epoch"] == 2 and manifest["final"]["step"] == STEPS
    assert [r["epoch"] for r in pq.read_table(out / manifest["paths"]["metrics.parquet"]).to_pylist()] == [1, 2]
    assert stderr.count("teacher epoch 2/2:") == 1  # only the main process logs epochs


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


@pytest.mark.slow
def test_torchrun_stage_stopped_by_sigterm_resumes_to_the_same_weights(prepared, tmp_path, ddp_teacher):
    out = tmp_path / "teacher"
    process = teacher_under_torchrun(prepared, out, "--checkpoint-every", "3")
    checkpoints = out / "checkpoints"
    wait_for(checkpoints, process)
    last = next(iter(checkpoints.iterdir())) / "last.pt"
    wait_for(last, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0 and "run the same command again to resume" in stderr, stderr
    assert not (out / "manifest.json").exists()
    state = torch.load(last, weights_only=True)
    assert 3 <= state["step"] < STEPS

    rerun = teacher_under_torchrun(prepared, out, "--checkpoint-every", "3")
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert stderr.count(f"resumed from {last} at epoch {state['epoch'] + 1}, batch {state['batch']}") == 2
    assert final_digests(stderr) == final_digests(ddp_teacher[2])  # as if never stopped
    assert not checkpoints.exists()
