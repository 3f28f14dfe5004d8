"""DDP: with the batch split over 2 gloo ranks, losses and gradients equal one process on the whole batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mvcl_fast
from helpers import exit_spawned_rank

WORLD = 2


def _run_ranks(fn, tmp_path, *args, backend="reference"):
    """Run fn(rank, *args) on WORLD gloo ranks; return the per-rank results."""
    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_rank_main, args=(fn, init, str(tmp_path), args, backend), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _rank_main(rank, fn, init, out_dir, args, backend):
    os.environ["MVCL_FAST_BACKEND"] = backend   # triton: the interpreter (inherited) on CPU
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        torch.save(fn(rank, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()   # neither rank tears gloo down while the other still talks to it
        dist.destroy_process_group()
    exit_spawned_rank()


def _prototype_rank(rank, z, y, num_classes, detach):
    rows = slice(rank * len(y) // WORLD, (rank + 1) * len(y) // WORLD)
    z_local = z[:, rows].clone().requires_grad_()
    loss = mvcl_fast.prototype_infonce(z_local, y[rows], num_classes, 0.2, detach_prototypes=detach,
                                       group=dist.group.WORLD)
    loss.backward()
    protos, counts = mvcl_fast.batch_prototypes(z_local[0].detach(), y[rows], num_classes,
                                                group=dist.group.WORLD)
    return {"loss": loss.detach(), "grad": z_local.grad, "protos": protos, "counts": counts}


@pytest.mark.parametrize("detach", [False, True])
def test_prototype_infonce_over_two_ranks_equals_whole_batch(tmp_path, detach):
    z = torch.randn(2, 12, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 2, 0, 4, 4, 1, 2, 2, 0, 1])  # class 3 absent everywhere, 4 on rank 0 only
    results = _run_ranks(_prototype_rank, tmp_path, z, y, 5, detach)
    z_full = z.clone().requires_grad_()
    loss = mvcl_fast.prototype_infonce(z_full, y, 5, 0.2, detach_prototypes=detach)
    loss.backward()
    protos, counts = mvcl_fast.batch_prototypes(z[0], y, 5)
    # DDP averages over ranks: the global loss is the mean of the rank losses,
    # and each rank's gradient (which carries every rank's loss through the
    # shared prototypes) divided by the world size is the whole-batch gradient.
    torch.testing.assert_close(torch.stack([r["loss"] for r in results]).mean(), loss.detach())
    grads = torch.cat([r["grad"] for r in results], dim=1) / WORLD
    torch.testing.assert_close(grads, z_full.grad)
    for r in results:
        torch.testing.assert_close(r["protos"], protos)
        assert r["counts"].tolist() == counts.tolist()


def _multiview_rank(rank, anchor, views, symmetric):
    rows = slice(rank * anchor.shape[0] // WORLD, (rank + 1) * anchor.shape[0] // WORLD)
    anchor_local = anchor[rows].clone().requires_grad_()
    views_local = [v[rows].clone().requires_grad_() for v in views]
    loss = mvcl_fast.multiview_infonce(anchor_local, views_local, 0.3, symmetric,
                                       group=dist.group.WORLD)
    loss.backward()
    return {"loss": loss.detach(), "anchor_grad": anchor_local.grad,
            "views_grad": torch.stack([v.grad for v in views_local])}


@pytest.mark.parametrize("backend,dtype", [("reference", torch.float64), ("triton", torch.float32)],
                         ids=["reference-fp64", "kernel-fp32"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_multiview_infonce_over_two_ranks_equals_whole_batch(tmp_path, symmetric, backend, dtype):
    """Each rank's share (its rows against the gathered keys) adds up to the whole batch."""
    anchor = torch.randn(10, 6, dtype=dtype)
    views = torch.randn(3, 10, 6, dtype=dtype)
    results = _run_ranks(_multiview_rank, tmp_path, anchor, views, symmetric, backend=backend)
    anchor_full, views_full = anchor.double().requires_grad_(), views.double().requires_grad_()
    loss = mvcl_fast.multiview_infonce(anchor_full, views_full, 0.3, symmetric)
    loss.backward()
    loss, anchor_grad, views_grad = (t.to(dtype) for t in (loss, anchor_full.grad, views_full.grad))
    # Negatives from both ranks; each rank's loss is the mean over its own rows, so (as for
    # the CE loss under DDP) the mean over ranks is the whole-batch loss.
    torch.testing.assert_close(torch.stack([r["loss"] for r in results]).mean(), loss.detach())
    assert not torch.allclose(results[0]["loss"], results[1]["loss"])
    torch.testing.assert_close(torch.cat([r["anchor_grad"] for r in results]) / WORLD, anchor_grad)
    torch.testing.assert_close(torch.cat([r["views_grad"] for r in results], dim=1) / WORLD,
                               views_grad)


def _nan_on_rank1(rank):
    """Each op with a NaN input on rank 1 only: the error must come on both ranks (no hang)."""
    messages = []
    z = torch.randn(2, 4, 6, dtype=torch.float64)
    anchor, views = torch.randn(4, 6), torch.randn(2, 4, 6)
    if rank == 1:
        z[0, 0, 0] = float("nan")
        views[1, 2, 3] = float("inf")
    calls = [lambda: mvcl_fast.prototype_infonce(z, torch.tensor([0, 1, 1, 0]), 2, 0.2,
                                                 group=dist.group.WORLD),
             lambda: mvcl_fast.batch_prototypes(z[0], torch.tensor([0, 1, 1, 0]), 2,
                                                group=dist.group.WORLD),
             lambda: mvcl_fast.multiview_infonce(anchor, views, 0.1, group=dist.group.WORLD),
             # the value checks' graph node under torch.compile, which names the group
             lambda: torch.ops.mvcl_fast.check_values([anchor, views], "anchor,views", "", None, 0,
                                                      dist.group.WORLD.group_name)]
    for call in calls:
        try:
            call()
            messages.append("no error")
        except ValueError as err:
            messages.append(str(err))
    return messages


def test_nan_on_one_rank_raises_on_every_rank(tmp_path):
    expected = ["z contains NaN or Inf on at least one rank"] * 2 + [
        "views contains NaN or Inf on at least one rank"] * 2
    assert _run_ranks(_nan_on_rank1, tmp_path) == [expected, expected]


def _bank_rank(rank, steps, num_classes):
    from mvcl_fast.intent.model import ModelOutput, MVCLLoss

    loss_fn = MVCLLoss(num_classes, lambda_mv=0, prototypes="ema", momentum=0.5, embedding_dim=6,
                       group=dist.group.WORLD)
    for fused, text, y in steps:
        rows = slice(rank * len(y) // WORLD, (rank + 1) * len(y) // WORLD)
        out = ModelOutput(torch.zeros(len(y[rows]), num_classes),
                          {"text": text[rows], "fused": fused[rows]}, None)
        loss_fn.update_prototype_bank(out, y[rows])
    return loss_fn.state_dict()


def test_ema_prototype_bank_is_the_global_batchs_on_every_rank(tmp_path):
    """Each rank updates its bank from its half of the batch: both end with the bank that one
    process keeps over the whole batches (class 3 is on rank 1 only, class 4 never)."""
    from mvcl_fast.intent.model import ModelOutput, MVCLLoss

    labels = [torch.tensor([0, 1, 1, 2, 0, 3]), torch.tensor([2, 2, 0, 1, 1, 1])]
    steps = [(torch.randn(6, 6), torch.randn(6, 6), y) for y in labels]
    ranks = _run_ranks(_bank_rank, tmp_path, steps, 5)
    whole = MVCLLoss(5, lambda_mv=0, prototypes="ema", momentum=0.5, embedding_dim=6)
    for fused, text, y in steps:
        whole.update_prototype_bank(ModelOutput(torch.zeros(6, 5), {"text": text, "fused": fused},
                                                None), y)
    for name in ("prototype_bank", "prototype_seen"):
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between the ranks"
        torch.testing.assert_close(ranks[0][name], whole.state_dict()[name])
    assert ranks[0]["prototype_seen"].tolist() == [True, True, True, True, False]
