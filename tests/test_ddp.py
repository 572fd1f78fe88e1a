"""Data-parallel training: batch sharding, the DDP wrappers that keep replicas identical, ``fit`` on two
processes against one and with CRKD's discriminator, the loss check every few steps, and a training stage
under ``torchrun`` on two CPU processes (gloo)."""

import copy
import math
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
from kd_lib.distill.terms import CrossResolutionKD
from kd_lib.engine import distributed
from kd_lib.engine.loop import SYNC_EVERY, NonFiniteLossError, fit
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
    with pytest.raises(ValueError, match="field 'batch_size': 6 must split evenly over 4 processes"):
        EpochBatchSampler(50, 6, seed=0, epoch=0, rank=0, world_size=4)


class Toy(nn.Module):
    """A task: a student with BatchNorm, a branch that only rank 1 uses, a module nothing uses, a frozen
    teacher with BatchNorm, and a discriminator that steps inside the forward."""

    def __init__(self):
        super().__init__()
        # momentum 0: the running mean stays what it was at the forward's start
        self.student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, momentum=0.0), nn.Linear(3, 2))
        self.branch, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)
        self.teacher = nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2)).requires_grad_(False).eval()
        self.adversary = AdversarialLoss(2, hidden=4)

    def forward(self, x, use_branch):
        out = self.student(x)
        discriminator = self.adversary.discriminator_step(self.teacher(x), out)
        loss = out.pow(2).sum() + (self.branch(x[:, :2]).sum() if use_branch else 0)
        return loss, {"discriminator": discriminator}


def _replica(rank: int, store: str, results: str) -> None:
    """One of two gloo processes: different initial weights and data on purpose, then one step of the
    task through :func:`distributed.data_parallel`, and one through an unwrapped copy for the local gradients."""
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    torch.manual_seed(rank)
    task = Toy()
    distributed.broadcast_state(task)
    with torch.no_grad():
        task.teacher[1].running_mean.fill_(rank)  # the frozen teacher is none of DDP's business
        task.student[1].running_mean.fill_(rank + 5)  # DDP copies rank 0's at the forward's start
    x = torch.randn(6, 4)
    local = copy.deepcopy(task)
    loss, _ = local(x, rank == 1)
    loss.backward()
    params = [p for name, p in task.named_parameters() if p.requires_grad and not name.startswith("adversary.")]
    model = distributed.data_parallel(task, params, torch.device("cpu"), find_unused=True)
    loss, terms = model(x, rank == 1)
    started = task.student[1].running_mean.clone()
    loss.backward()
    local_grads = [None if p.grad is None else p.grad.clone()
                   for name, p in local.named_parameters() if p.requires_grad and not name.startswith("adversary.")]
    torch.save({"local": local_grads, "averaged": [p.grad for p in params],
                "digests": distributed.parameters_digest(task.adversary),
                "teacher": task.teacher[1].running_mean.clone(), "student_buffer": started,
                "state": list(task.state_dict()), "terms": terms["discriminator"].item(),
                "agreed": distributed.agree(torch.tensor([[float(rank), 2.0]]),
                                            [rank == 1, False])},
               f"{results}/{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_data_parallel_averages_gradients_and_keeps_replicas_identical(tmp_path):
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_replica, args=(rank, str(tmp_path / "store"), str(tmp_path)))
                 for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0]
    first, second = (torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2))
    # the discriminator stepped on different data in each process, with its gradients averaged by its own DDP
    assert first["digests"] == second["digests"]
    assert first["terms"] != second["terms"]  # the discriminator's loss is each process's own
    assert torch.equal(first["student_buffer"], torch.full((3,), 5.0))  # rank 0's statistics
    assert torch.equal(second["student_buffer"], torch.full((3,), 5.0))
    assert not torch.equal(first["teacher"], second["teacher"])  # the teacher is not wrapped
    assert first["state"] == second["state"] == list(Toy().state_dict())  # no new names in the state dict
    assert len(first["averaged"]) == 10
    for a, b, mine, theirs in zip(first["averaged"], second["averaged"], first["local"], second["local"]):
        if mine is None and theirs is None:
            assert a is None and b is None  # no gradient anywhere: the optimizer skips it
            continue
        zero = torch.zeros_like(theirs if mine is None else mine)
        expected = ((zero if mine is None else mine) + (zero if theirs is None else theirs)) / 2
        torch.testing.assert_close(a, expected)
        assert torch.equal(a, b)
    assert first["agreed"] == second["agreed"] == ([0.5, 2.0], [True, False])


class Recording(torch.utils.data.Dataset):
    """A dataset that records the index of every item read (``num_workers=0``: in this process)."""

    def __init__(self, dataset):
        self.dataset, self.pairing, self.indices = dataset, dataset.pairing, []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        self.indices.append(item[0])
        return self.dataset[item]


def _crkd_task() -> Distiller:
    """CRKD from a small frozen HR teacher into a small LR student, with its adversarial discriminator."""
    def convnet(width: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(width, 3))

    term = CrossResolutionKD(4, 6, embed_weight=1.0, pair_weight=1.0, mmd_weight=1.0, adv_weight=0.1, adv_lr=1e-2)
    return Distiller(convnet(4), "lr", convnet(6), [term])


def _fit_process(rank: int, world: int, port: int, data: str, results: str, method: str) -> None:
    """``fit`` in process ``rank`` of ``world`` (joined as under torchrun when ``world`` > 1): one epoch of
    ``method``: ``linear``, a model without BatchNorm, whose update on a batch split over processes is the
    update on the whole batch, if the processes average their gradients; or ``crkd`` (:func:`_crkd_task`)."""
    if world > 1:
        os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    task = _crkd_task() if method == "crkd" else Distiller(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)), "lr")
    before = copy.deepcopy(task.state_dict())
    train_set = Recording(ShardedImageDataset(data, "train", CropTransform(32, 4, train=True)))
    settings = TrainSettings(epochs=1, batch_size=8, lr=0.05, device="cpu", num_workers=0)
    with distributed.process_group(torch.device("cpu")):
        rows = fit(task, train_set, settings, f"{results}/checkpoints-{world}", lambda student, device: {})
    torch.save({"indices": train_set.indices, "student": task.student.state_dict(), "before": before,
                "after": task.state_dict(), "digest": distributed.parameters_digest(task), "rows": rows},
               f"{results}/{world}-{rank}.pt")


def _spawn(world: int, data: str, results: Path, method: str = "linear") -> list[dict]:
    """What :func:`_fit_process` saved in each of ``world`` processes, by rank."""
    context = multiprocessing.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = [context.Process(target=_fit_process, args=(rank, world, port, data, str(results), method))
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
    # the epoch's mean loss: over the processes, then over the steps, as in one process
    assert first["rows"][0]["train_loss"] == second["rows"][0]["train_loss"]
    assert first["rows"][0]["train_loss"] == pytest.approx(whole["rows"][0]["train_loss"], rel=1e-5)
    saved = torch.load(tmp_path / "checkpoints-2" / "last.pt", weights_only=True)
    torch.testing.assert_close(saved["task"]["student"], first["student"], rtol=0, atol=0)  # no "module." names


@pytest.mark.slow
def test_crkd_trains_identical_replicas_on_two_processes(prepared, tmp_path):
    first, second = _spawn(2, prepared, tmp_path, "crkd")
    assert first["digest"] == second["digest"]  # student, adapter, discriminator, BatchNorm statistics
    discriminator = [k for k in first["after"] if ".discriminator." in k]
    assert discriminator and all(not torch.equal(first["after"][k], first["before"][k]) for k in discriminator)
    assert not torch.equal(first["after"]["student.5.weight"], first["before"]["student.5.weight"])
    assert list(first["after"]) == list(_crkd_task().state_dict())
    row = first["rows"][0]
    logged = [k for k in row if k in ("epoch", "step", "lr") or k.startswith("train_")]
    assert {k: row[k] for k in logged} == {k: second["rows"][0][k] for k in logged}  # the same logged means
    assert {"train_discriminator", "train_adv", "train_mmd"} <= set(row)
    assert all(math.isfinite(row[k]) for k in row if k.startswith("train_"))
    saved = torch.load(tmp_path / "checkpoints-2" / "last.pt", weights_only=True)["task"]
    assert set(saved["terms"]) == {k.removeprefix("terms.") for k in first["after"] if k.startswith("terms.")}
    assert len(saved["adversaries"]) == 1


class NaNFrom(Distiller):
    """A loss that becomes NaN at the ``first``-th step (counting from 0)."""

    def __init__(self, first: int):
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)), "lr")
        self.first, self.calls = first, 0

    def forward(self, hr, lr, labels):
        loss, terms = super().forward(hr, lr, labels)
        self.calls += 1
        return (loss * float("nan") if self.calls > self.first else loss), terms


@pytest.mark.parametrize("first, checkpoint_every, found, saved_step", [
    (7, 3, 8, 6),  # found before the checkpoint of step 9 (batch 8), which is not written; step 6's is the last
    (3, 100, 9, None),  # found at the sync of step 10 (SYNC_EVERY): no checkpoint yet
])
def test_a_nan_loss_is_found_within_a_few_steps_and_never_checkpointed(prepared, tmp_path, first,
                                                                       checkpoint_every, found, saved_step):
    assert SYNC_EVERY == 10
    torch.manual_seed(0)
    task = NaNFrom(first)
    train_set = ShardedImageDataset(prepared, "train", CropTransform(32, 4, train=True))
    settings = TrainSettings(epochs=1, batch_size=4, lr=0.05, device="cpu", num_workers=0,
                             checkpoint_every=checkpoint_every)
    last = tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(NonFiniteLossError, match=rf"loss is nan at epoch 1, batch {first} \(ce=[0-9.]+; found "
                                                 rf"after batch {found}, .*the last good checkpoint is {last}"):
        fit(task, train_set, settings, str(tmp_path / "checkpoints"), lambda student, device: {})
    assert not all(torch.isfinite(p).all() for p in task.student.parameters())  # trained on after the NaN
    if saved_step is None:
        assert not last.exists()
    else:
        saved = torch.load(last, weights_only=True)
        assert saved["loop"]["step"] == saved_step and all(math.isfinite(v) for v in saved["loop"]["sums"].values())
        assert all(torch.isfinite(t).all() for t in saved["task"]["student"].values())


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
