"""DistributedDataParallel training of a model with push-pull layers equals single-process training."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ddp_training


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_ddp_two_processes_equal_one_process(tmp_path):
    # A file store rendezvous: no port to find free (and to lose to another process meanwhile).
    mp.spawn(ddp_training.ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "result.pt")), nprocs=2)
    ddp = torch.load(tmp_path / "result.pt")
    model = ddp_training.make_model()
    grads = ddp_training.train(model)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ddp["grads"][f"module.{name}"], grads[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ddp["params"][f"module.{name}"], param.detach(), rtol=1e-10, atol=1e-12)
    assert set(ddp["params"]) == {f"module.{name}" for name, _ in model.named_parameters()}
