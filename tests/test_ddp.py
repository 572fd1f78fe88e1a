"""Data-parallel training: batch sharding, the collectives that keep replicas identical, ``fit`` on two
processes against one, and a training stage under ``torchrun`` on two CPU processes (gloo)."""

import multiprocessing
import os
import re
import signal
import socket
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
from kd_lib.data.shards import ShardedImageDataset
from kd_lib.data.transforms import CropTransform
from kd_lib.distill.distiller import Distiller
from kd_lib.engine import distributed
from kd_lib.engine.loop import fit
from kd_lib.engine.settings import TrainSettings
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


class Recording(torch.utils.data.Dataset):
    """A dataset that records the index of every item read (``num_workers=0``: in this process)."""

    def __init__(self, dataset):
        self.dataset, self.pairing, self.indices = dataset, dataset.pairing, []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        self.indices.append(item[0])
        return self.dataset[item]


def _fit_process(rank: int, world: int, port: int, data: str, results: str) -> None:
    """``fit`` in process ``rank`` of ``world`` (joined as under torchrun when ``world`` > 1): one epoch of
    a model without BatchNorm, whose update on a batch split over processes is the update on the whole
    batch, if the processes average their gradients."""
    if world > 1:
        os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    task = Distiller(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)), "lr")
    train_set = Recording(ShardedImageDataset(data, "train", CropTransform(32, 4, train=True)))
    settings = TrainSettings(epochs=1, batch_size=8, lr=0.05, device="cpu", num_workers=0)
    with distributed.process_group(torch.device("cpu")):
        fit(task, train_set, settings, f"{results}/checkpoints-{world}", lambda student, device: {})
    torch.save({"indices": train_set.indices, "student": task.student.state_dict()},
               f"{results}/{world}-{rank}.pt")


def _spawn(world: int, data: str, results: Path) -> list[dict]:
    """What :func:`_fit_process` saved in each of ``world`` processes, by rank."""
    context = multiprocessing.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = [context.Process(target=_fit_process, args=(rank, world, port, data, str(results)))
                 for rank in range(world)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [p.exitcode for p in processes] == [0] * world
    return [torch.load(results / f"{world}-{rank}.pt", weights_only=True) for rank in range(world)]


@pytest.mark.slow
def test_fit_splits_each_batch_between_processes_and_averages_their_gradients(prepared, tmp_path):
    [whole] = _spawn(1, prepared, tmp_path)
    first, second = _spawn(2, prepared, tmp_path)
    share, steps = 4, 72 // 8
    assert len(whole["indices"]) == 2 * steps * share
    assert len(first["indices"]) == len(second["indices"]) == steps * share
    for step in range(steps):
        mine, theirs = (r["indices"][step * share:(step + 1) * share] for r in (first, second))
        assert not set(mine) & set(theirs), f"step {step}: both processes read {set(mine) & set(theirs)}"
        assert sorted(mine + theirs) == sorted(whole["indices"][step * 2 * share:(step + 1) * 2 * share])
    torch.testing.assert_close(first["student"], second["student"], rtol=0, atol=0)
    # the mean of the halves' gradients is the whole batch's gradient (their sum would be twice it)
    torch.testing.assert_close(first["student"], whole["student"])


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


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
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
    loop = torch.load(last, weights_only=True)["loop"]
    assert 3 <= loop["step"] < STEPS

    rerun = teacher_under_torchrun(prepared, out, "--checkpoint-every", "3")
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert stderr.count(f"resumed from {last} at epoch {loop['epoch'] + 1}, batch {loop['batch']}") == 2
    digests = final_digests(stderr)
    assert sorted(digests) == ["0", "1"] and digests == final_digests(ddp_teacher[2])  # as if never stopped
    assert not checkpoints.exists()
