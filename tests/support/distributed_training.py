"""A small model with push-pull layers trained a few SGD steps, the same way in one process on the whole
batch and in data-parallel processes on a shard each: DistributedDataParallel, or FSDP2 (fully_shard)
with every parameter sharded across the processes. Imported by the spawned workers."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from pushpull_ext import convert

STEPS, BATCH = 3, 8


def make_model() -> nn.Module:
    torch.manual_seed(0)  # every process builds the same model
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    convert(model, ["0"], pull="invert", avg_kernel=3, bias_out=True, train_alpha=True)  # 2024 stem
    convert(model, ["2"], pull="upsample", train_alpha=True, alpha_relu=True)  # 2020 layer
    return model.double()


def batches() -> list:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, 3, 12, 12, generator=generator, dtype=torch.float64),
            torch.randint(0, 4, (BATCH,), generator=generator),
        )
        for _ in range(STEPS)
    ]


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded FSDP2 parameter or gradient (a DTensor) gathered from every process."""
    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def train(model: nn.Module, rank: int = 0, world_size: int = 1, run=None) -> dict:
    """SGD steps on this rank's shard of every batch through `run` (the model or its DDP wrapper); returns
    the last step's whole gradients by the model's parameter names."""
    run = run or model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    shard = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    for x, y in batches():
        optimizer.zero_grad()
        F.cross_entropy(run(x[shard]), y[shard]).backward()
        optimizer.step()
    return {name: full(p.grad).clone() for name, p in model.named_parameters()}


def _ddp(model: nn.Module, world_size: int) -> nn.Module:
    return DistributedDataParallel(model)


def _fsdp2(model: nn.Module, world_size: int) -> nn.Module:
    """fully_shard each layer with parameters, then the whole model (in place: the model runs itself)."""
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        if list(layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())  # really sharded
    return model


WRAPPERS = {"ddp": _ddp, "fsdp2": _fsdp2}


def worker(rank: int, world_size: int, store_file: str, result_file: str, wrapper: str) -> None:
    """One process (gloo, CPU) training through WRAPPERS[wrapper]; rank 0 saves the whole final parameters
    and last gradients by the plain model's parameter names."""
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size)
    try:
        model = make_model()
        grads = train(model, rank, world_size, run=WRAPPERS[wrapper](model, world_size))
        params = {name: full(p) for name, p in model.named_parameters()}  # every rank joins the gathers
        if rank == 0:
            torch.save({"params": params, "grads": grads}, result_file)
        # Both ranks leave together: a rank tearing gloo down while its peer still works aborted the
        # peer once ("terminate called without an active exception", a fresh-clone CI run).
        dist.barrier()
    finally:
        dist.destroy_process_group()
