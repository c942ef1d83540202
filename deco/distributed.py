"""Data-parallel training helpers: process-group set-up from torchrun's environment, rank queries, reductions,
and a sharded data order that can be resumed in the middle of an epoch.

Works unchanged in a plain single process (world size 1, no process group) and under
``torchrun --nproc_per_node N`` (``env://`` initialisation; NCCL on CUDA, Gloo on the CPU).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "ResumableSampler",
    "SeededSampleDataset",
    "all_reduce_mean",
    "barrier",
    "cleanup",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "mean_num_boxes",
]

logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(device: str) -> torch.device:
    """Join the process group that torchrun describes (``WORLD_SIZE`` > 1 in the environment) and return the
    device this process trains on: ``cuda:LOCAL_RANK`` for ``device="cuda"``, else the device given.
    Without torchrun's variables nothing is initialised and ``torch.device(device)`` is returned."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    target = torch.device(device)
    if world_size <= 1 or is_distributed():
        if target.type == "cuda" and target.index is None and is_distributed():
            target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return target
    if target.type == "cuda":
        target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(target)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://")
    logger.info("rank %d of %d joined the %s process group on %s", get_rank(), get_world_size(), backend, target)
    return target


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over all ranks (a new tensor; the input is unchanged)."""
    if not is_distributed():
        return tensor.clone()
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced)
    return reduced / get_world_size()


def mean_num_boxes(local_count: int, device: torch.device) -> torch.Tensor:
    """The number of target boxes per rank, averaged over ranks and clamped at 1 (a float32 scalar tensor).

    Every rank divides its summed loss by this number, and DDP averages the gradients, so the result is the
    gradient of the global batch's summed loss divided by the global number of boxes."""
    # A fill, not torch.tensor(..., device=device): on a GPU that is a blocking copy, which waits for the queue.
    count = torch.full((), float(local_count), dtype=torch.float32, device=device)
    return all_reduce_mean(count).clamp(min=1)


class ResumableSampler(torch.utils.data.Sampler):
    """The data order of one rank: like ``DistributedSampler``, but it yields ``(epoch, index)`` keys and can
    start in the middle of an epoch.

    Each epoch shuffles ``range(dataset_size)`` with a generator seeded by ``(seed, epoch)`` (so the order
    depends on nothing but those two numbers), pads it by repetition to a multiple of ``num_replicas`` and
    gives rank r every ``num_replicas``-th index starting at r. ``set_epoch(epoch, start)`` selects the epoch
    and skips its first ``start`` samples of this rank (the ones a resumed run has already trained on).
    The epoch travels with each index so that :class:`SeededSampleDataset` can seed the augmentation.
    """

    def __init__(
        self,
        dataset_size: int,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if dataset_size < 1:
            raise ValueError(f"dataset_size must be >= 1; got {dataset_size}")
        self.dataset_size = dataset_size
        self.num_replicas = get_world_size() if num_replicas is None else num_replicas
        self.rank = get_rank() if rank is None else rank
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must lie in [0, {self.num_replicas}); got {self.rank}")
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0

    @property
    def samples_per_rank(self) -> int:
        if self.drop_last:
            return self.dataset_size // self.num_replicas
        return -(-self.dataset_size // self.num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.samples_per_rank:
            raise ValueError(f"start must lie in [0, {self.samples_per_rank}]; got {start}")
        self.epoch = epoch
        self.start = start

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's full index list for ``epoch``."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        total = self.samples_per_rank * self.num_replicas
        order = (order * (-(-total // len(order))))[:total]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.epoch_indices(self.epoch)[self.start :]:
            yield self.epoch, index

    def __len__(self) -> int:
        return self.samples_per_rank - self.start

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "start": self.start, "shuffle": self.shuffle}


class SeededSampleDataset(torch.utils.data.Dataset):
    """Wraps a dataset whose random augmentation draws from Python's ``random``, NumPy and torch: item
    ``(epoch, index)`` is produced under all three generators seeded from ``(seed, epoch, index)`` and the
    caller's generator states are restored afterwards.

    So every sample's augmentation is a function of (seed, epoch, index) only: the same in a resumed run, in
    any number of loader workers and on any rank, which is what makes resuming exact and what lets a
    data-parallel run see the same augmented images as a single process.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int = 0):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        state = np.random.SeedSequence([self.seed, epoch, index]).generate_state(2)
        sample_seed = int(state[0]) << 32 | int(state[1])
        python_state = random.getstate()
        numpy_state = np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)
            torch.manual_seed(sample_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)

    def __getattr__(self, name: str):
        # Dataset attributes (``categories``, ``coco``, ...) stay reachable through the wrapper.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
