"""Data-parallel training of a model with push-pull layers on two processes (gloo, CPU) equals
single-process training: DistributedDataParallel, and FSDP2 (fully_shard, parameters sharded)."""

import distributed_training
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
@pytest.mark.parametrize("wrapper", sorted(distributed_training.WRAPPERS))
def test_two_processes_equal_one_process(wrapper, tmp_path):
    # A file store rendezvous: no port to find free (and to lose to another process meanwhile).
    mp.spawn(
        distributed_training.worker, args=(2, str(tmp_path / "store"), str(tmp_path / "result.pt"), wrapper), nprocs=2
    )
    parallel = torch.load(tmp_path / "result.pt")
    model = distributed_training.make_model()
    grads = distributed_training.train(model)
    assert set(parallel["params"]) == set(parallel["grads"]) == {name for name, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        torch.testing.assert_close(parallel["grads"][name], grads[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(parallel["params"][name], param.detach(), rtol=1e-10, atol=1e-12)
