"""Training batches built ahead of the training loop, in DataLoader worker processes (`trainer.data_workers`).

A batch stays a pure function of its step: worker k of n builds the batches of steps start + k, start + k + n, ...,
and the DataLoader hands them over in worker order, so the loop receives steps start, start + 1, ... exactly as if
it had built them itself; each item carries its step, and the loop checks it. A resumed run starts the workers at
its resumed step. A worker builds the global batch, as every rank does, and hands over its rank's slice only.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hybrids.training.data import rank_slice
from hybrids.training.tasks import Task


class StepBatches(IterableDataset):
    """(step, this rank's slice of the step's training batch) for step = start, start + 1, ..."""

    def __init__(self, task: Task, batch_size: int, start: int, rank: int, world_size: int):
        self.task, self.batch_size, self.start = task, batch_size, start
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        info = get_worker_info()
        offset, stride = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)  # a batch is index arithmetic: leave the cores to the training loop
        step = self.start + offset
        while True:
            batch = self.task.batch(step, self.batch_size, "train")
            yield step, rank_slice(batch, self.rank, self.world_size)
            step += stride


def data_workers(setting: int | str, on_cuda: bool) -> int:
    """`trainer.data_workers`: a number of worker processes, or auto (2 when training on CUDA, where the loop
    should not wait for the CPU; 0 on CPU, where the cores train)."""
    if setting == "auto":
        return min(2, os.cpu_count() or 1) if on_cuda else 0
    return int(setting)


def step_loader(task: Task, batch_size: int, start: int, rank: int, world_size: int, workers: int,
                pin_memory: bool = False) -> DataLoader:
    """The DataLoader of StepBatches with `workers` processes, each keeping up to 4 batches ready; with pin_memory
    (training on CUDA) in page-locked memory, so that the copy to the GPU does not wait for the GPU."""
    return DataLoader(StepBatches(task, batch_size, start, rank, world_size), batch_size=None, num_workers=workers,
                      prefetch_factor=4, persistent_workers=False, pin_memory=pin_memory)
