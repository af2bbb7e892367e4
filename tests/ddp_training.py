"""A small model with push-pull layers trained a few SGD steps, the same way in one process on the whole
batch and in DistributedDataParallel processes on a shard each (imported by the spawned workers)."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pushpull_ext import convert

STEPS, BATCH = 3, 8


def make_model() -> nn.Module:
    torch.manual_seed(0)  # every process builds the same model
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    convert(model, ["0"], pull="invert", avg_kernel=3, bias_out=True, train_alpha=True)  # 2024 stem
    convert(model, ["2"], pull="upsample", train_alpha=True, alpha_relu=True)  # 2020 layer
    return model.double()


def batches() -> list:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 12, 12, generator=generator, dtype=torch.float64),
             torch.randint(0, 4, (BATCH,), generator=generator)) for _ in range(STEPS)]


def train(model: nn.Module, rank: int = 0, world_size: int = 1) -> dict:
    """SGD steps on this rank's shard of every batch; returns the last step's gradients by name."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    shard = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    for x, y in batches():
        optimizer.zero_grad()
        F.cross_entropy(model(x[shard]), y[shard]).backward()
        optimizer.step()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def ddp_worker(rank: int, world_size: int, store_file: str, result_file: str) -> None:
    """One DDP process (gloo, CPU); rank 0 saves the final parameters and last gradients."""
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size)
    try:
        model = DistributedDataParallel(make_model())
        grads = train(model, rank, world_size)
        if rank == 0:
            params = {name: p.detach() for name, p in model.named_parameters()}
            torch.save({"params": params, "grads": grads}, result_file)
        # Both ranks leave together: a rank tearing gloo down while its peer still works aborted the
        # peer once ("terminate called without an active exception", a fresh-clone CI run).
        dist.barrier()
    finally:
        dist.destroy_process_group()
