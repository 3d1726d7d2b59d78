"""Data-parallel training under torchrun: which process this is, and the few collectives training needs.

``torchrun --nproc_per_node=N -m zar train ...`` starts N processes with RANK, LOCAL_RANK and
WORLD_SIZE (and the rendezvous) in their environment. Without them, a plain ``zar train``, every
function here answers for one process and calls nothing. Backend: NCCL when the rank trains on
a GPU (its own, ``cuda:LOCAL_RANK``), gloo on the CPU. torch only: zar.training decides that rank 0
alone records to MLflow and writes checkpoints.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

FAILURE_KEY = "zar/failed"  # in torchrun's rendezvous store: why a rank failed, for rank 0 to record
TIMEOUT = timedelta(minutes=10)  # a collective waits this long for a rank that stopped answering


def requested() -> bool:
    """Whether torchrun (or another launcher of torch.distributed) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if active() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def rank_device(device: torch.device) -> torch.device:
    """A CUDA device under torchrun is this rank's own GPU (``cuda:LOCAL_RANK``)."""
    if requested() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init() -> None:
    """Join torchrun's process group, once: gloo for CPU tensors, and NCCL for CUDA ones where
    there is a GPU (the rank's own), so the same group serves whichever device the run picks."""
    if not requested() or active():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)


def shard(n: int) -> list[int]:
    """This rank's share of ``n`` evaluation samples: every world_size-th, none twice, none padded."""
    return list(range(rank(), n, world_size()))


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over the ranks (float64: counts stay exact)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather(obj) -> list:
    """Every rank's ``obj``, in rank order."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank, so that all evaluate the same
    model, the one rank 0 records: each rank's last training batch updated only its own copy."""
    if active():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def record_failure(message: str) -> None:
    """Leave why this rank failed where rank 0 finds it once torchrun stops the others."""
    store = _store()
    if store is not None:
        store.set(FAILURE_KEY, f"rank {rank()}: {message}")


def failure() -> str | None:
    """Why another rank failed, if one said so."""
    store = _store()
    try:
        if store is not None and store.check([FAILURE_KEY]):
            return store.get(FAILURE_KEY).decode()
    except Exception:  # the store went with the job: nothing to say
        return None
    return None


def _store():
    if not active():
        return None
    try:  # the process group's own store (torchrun's, which outlives any one rank)
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:
        return None


def close() -> None:
    if active():
        dist.destroy_process_group()
