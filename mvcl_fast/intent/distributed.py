"""The trainer's view of torch.distributed: one process per device, launched by torchrun.

``torchrun --nproc_per_node=N -m mvcl_fast.train`` sets RANK, WORLD_SIZE and
LOCAL_RANK; :func:`from_env` turns them into a :class:`Distributed` (nccl on
CUDA, gloo on the CPU). A plain ``python -m mvcl_fast.train`` gets the
single-process context, whose collectives are no-ops, so the trainer has one
code path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from mvcl_fast.intent.errors import ConfigError

NO_CUDA_HINT = "pass --device cpu (or auto), or run where torch.cuda.is_available() is True"


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def group(self) -> Optional[Any]:
        """The process group the losses all-reduce/all-gather over (None: one process)."""
        return dist.group.WORLD if self.enabled else None

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any(self, *flags: bool) -> list[bool]:
        """Element-wise OR of boolean flags over all ranks (one small all-reduce)."""
        if not self.enabled:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of floats over all ranks."""
        if not self.enabled or not values:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's obj (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @property
    def _comm_device(self) -> torch.device:
        # nccl moves only CUDA tensors; gloo takes CPU ones.
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def from_env(device: str = "auto") -> Distributed:
    """The context of this process: torchrun's environment, or the single process.

    device: "auto" (CUDA when available), "cpu", or "cuda". Under torchrun
    each process takes cuda:LOCAL_RANK; an explicit index would put every
    rank on the same GPU, so it is refused.
    """
    if not launched_by_torchrun():
        return Distributed(device=_single_device(device))
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {key} is not set",
                              "start several processes with torchrun --nproc_per_node=N -m "
                              "mvcl_fast.train, or unset WORLD_SIZE for one")
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK",
                          "pass --device auto, cuda or cpu (and CUDA_VISIBLE_DEVICES to pick GPUs)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: CUDA is not available on this machine", NO_CUDA_HINT)
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but this node has {torch.cuda.device_count()} "
                              "GPU(s)", "lower --nproc_per_node")
        torch.cuda.set_device(local)
        target = torch.device("cuda", local)
    else:
        target = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Distributed(rank=rank, world_size=world, local_rank=local, device=target)


def _single_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine", NO_CUDA_HINT)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}",
                          "pass one of them, or --device cuda")
    return device
