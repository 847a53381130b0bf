"""Data-parallel ranks (`--gpus N`, DistributedDataParallel) take the one-process model's steps.

Each rank builds the network as `alexcli train` does (alexcli.train.loop: the same initial weights on
every rank, wrapped in DDP when there are several) and steps on its half of each batch; after every
step the weights must equal those of one process stepping on the whole batch. On the CPU the ranks
talk over gloo; with `--rank-devices cuda:0,cuda:0` two ranks share one GPU, over gloo too (NCCL
refuses two ranks on one device): what a one-GPU machine can check of the multi-GPU CUDA code.
Double precision, so that no ReLU or max-pool choice flips between the two ways of summing.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from alexcli.model.registry import make_arch
from alexcli.train.config import TrainConfig
from alexcli.train.step import TrainStep

WORLD, BATCH, STEPS = 2, 8, 4
ARCH = make_arch("alexnet", init="kaiming", width=0.125, crop=64, dropout=0.0, num_classes=10)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


def _config(device: str, world: int) -> TrainConfig:
    shared = ("cuda:0",) * world if device == "cuda" and world > 1 else ()
    return TrainConfig(data="unused", out="unused", gpus=world, device=device, rank_devices=shared, lr=0.01)


def _batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    return torch.rand(BATCH, 3, 64, 64, generator=g, dtype=torch.float64), torch.randint(0, 10, (BATCH,), generator=g)


def _steps(rank: int, world: int, device: str) -> list[dict]:
    """The weights after each step, taken as rank RANK of WORLD on its share of every batch."""
    from alexcli.train import loop

    torch.set_default_dtype(torch.float64)
    cfg = _config(device, world)
    r = loop.Rank(rank, world, rank, cfg)
    net, runner, opt, _, _ = loop._build(cfg, ARCH, r, 0)
    if world > 1:
        assert type(runner).__name__ == "DistributedDataParallel"
    step = TrainStep(runner, opt)
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    after = []
    for k in range(STEPS):
        x, y = _batch(k)
        step.update(x[share].to(r.device), y[share].to(r.device))
        after.append({n: t.detach().cpu().clone() for n, t in net.state_dict().items()})
    return after


def _rank_main(rank: int, port: int, device: str, path: str) -> None:
    import torch.distributed as dist

    from alexcli.train import launch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = _config(device, WORLD)
    launch._init_dist(rank, WORLD, cfg)
    try:
        assert dist.get_backend() == "gloo"
        after = _steps(rank, WORLD, device)
        torch.save(after, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ranks_sharing_one_gpu_talk_over_gloo():
    from alexcli.train.launch import dist_backend

    assert dist_backend(_config("cuda", 2)) == "gloo"
    assert dist_backend(_config("cpu", 2)) == "gloo"
    distinct = TrainConfig(data="d", out="o", gpus=2, device="cuda", rank_devices=("cuda:0", "cuda:1"))
    assert dist_backend(distinct) == ("nccl" if torch.cuda.is_available() else "gloo")


@pytest.mark.parametrize("device", DEVICES)
def test_two_ranks_take_the_one_process_steps(device, tmp_path):
    from alexcli.train.launch import _free_port

    path = str(tmp_path / "after")
    mp.start_processes(_rank_main, args=(_free_port(), device, path), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(f"{path}.{k}") for k in range(WORLD)]
    saved = torch.get_default_dtype()
    try:
        alone = _steps(0, 1, device)
    finally:
        torch.set_default_dtype(saved)
    for k in range(STEPS):
        for name, ref in alone[k].items():
            for rank, theirs in enumerate(ranks):
                torch.testing.assert_close(theirs[k][name], ref, rtol=1e-9, atol=1e-12,
                                           msg=f"step {k + 1}: {name} of rank {rank}")
    first = next(iter(alone[-1]))
    assert not torch.equal(alone[-1][first], alone[0][first]), "the weights did not move"


def test_a_local_rank_beyond_rank_devices_is_refused_in_one_line():
    """Under torchrun more ranks can start on a machine than --rank-devices names: a usage error,
    not an IndexError."""
    from alexcli.errors import UsageError
    from alexcli.train import loop

    cfg = TrainConfig(data="d", out="o", gpus=2, device="auto", rank_devices=("cuda:0", "cuda:0"))
    with pytest.raises(UsageError, match=r"^--rank-devices cuda:0,cuda:0: names 2 device\(s\), but this is local rank 2$"):
        loop.Rank(2, 4, 2, cfg)


@pytest.mark.parametrize("settings, torchrun, message", [
    # torchrun's ranks split the batch: 100 over 16 would silently train on 96 images a step
    ({"batch": 100}, (16, 8), "--batch 100 does not split evenly over the 16 ranks torchrun started (WORLD_SIZE)"),
    ({"batch": 128, "gpus": 2}, (16, 8), "--gpus 2: under torchrun the ranks are torchrun's (WORLD_SIZE 16); "
                                          "leave --gpus out"),
    ({"rank_devices": ("cuda:0",)}, (4, 2), "--rank-devices cuda:0: expected one CUDA device per rank on this "
                                             "machine (torchrun's LOCAL_WORLD_SIZE 2) like cuda:0,cuda:1 (or "
                                             "cuda:0,cuda:0 to share one GPU)"),
    ({"parallel": "columns"}, (2, 2), "--parallel columns uses 2 GPUs in one process: run it without torchrun"),
    # without torchrun, --gpus is the count
    ({"batch": 100, "gpus": 16}, None, "--batch 100 does not split evenly over --gpus 16"),
    ({"rank_devices": ("cuda:0", "cuda:1")}, None, "--rank-devices cuda:0,cuda:1: expected one CUDA device per rank "
                                                    "(--gpus 1) like cuda:0 (or cuda:0 to share one GPU)"),
])
def test_ranks_are_checked_against_the_launch_that_started_them(settings, torchrun, message):
    from alexcli.errors import UsageError

    cfg = TrainConfig(data="d", out="o", **settings)
    with pytest.raises(UsageError) as exc:
        cfg.validate(torchrun)
    assert str(exc.value) == message


def test_under_torchrun_the_ranks_on_this_machine_name_their_devices():
    """--rank-devices under torchrun names LOCAL_WORLD_SIZE devices, not --gpus' (left at 1), and a
    --gpus equal to the launch's world is accepted (a library caller's config)."""
    TrainConfig(data="d", out="o", rank_devices=("cuda:0", "cuda:1")).validate((4, 2))
    TrainConfig(data="d", out="o", gpus=4, batch=128).validate((4, 2))


def test_torchrun_world_reads_the_launch_environment(monkeypatch):
    from alexcli.env import torchrun_world
    from alexcli.errors import UsageError

    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_world() is None
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert torchrun_world() is None  # no RANK: not a torchrun launch
    monkeypatch.setenv("RANK", "3")
    assert torchrun_world() == (16, 16)  # one machine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert torchrun_world() == (16, 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "eight")
    with pytest.raises(UsageError, match=r"^LOCAL_WORLD_SIZE='eight' in the environment: expected a number of ranks"):
        torchrun_world()
