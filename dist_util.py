"""The processes of a torchrun run: which one this is, joining and leaving the process group, values sent
between processes, and how a process ends.

Nothing happens at import time; torch.distributed is imported where it is used.
"""
import os
import sys

import torch


def all_gather_varlen(x):
    """Concatenate 1-D tensors of possibly different lengths from every process, in rank order."""
    import torch.distributed as dist
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=x.dtype, device=x.device)
    padded[:len(x)] = x
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])


def torchrun_env():
    """(rank, world_size, local_rank) of this process from torchrun's environment; (0, 1, 0) without it."""
    if 'WORLD_SIZE' not in os.environ:
        return 0, 1, 0
    try:
        return int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ.get('LOCAL_RANK', 0))
    except (KeyError, ValueError):
        raise ValueError('WORLD_SIZE is set but RANK is missing or not a number: start several processes with '
                         'torchrun (see docs/long-runs.md), or unset WORLD_SIZE') from None


def init_distributed(device, rank, world):
    """Join the process group that torchrun announced: NCCL between GPUs, gloo between CPU processes."""
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', rank=rank, world_size=world)


def end_distributed(together=False):
    """Leave the process group, if this process is in one. together: every process ends here at the same point
    (a finished run, or a stop they agreed on), so they first wait for each other; a process that leaves while
    another still writes its files was seen to abort in the group's teardown."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def exit_process(code):
    """End the program with exit status `code`. One of several torchrun processes leaves without the
    interpreter's teardown: a gloo worker thread may still be freeing a finished collective's tensors, which
    takes the GIL, and if the interpreter is shutting down by then the process aborts (docs/long-runs.md).
    Every file is written and closed by then; stdout and stderr are flushed here."""
    if os.environ.get('WORLD_SIZE', '1') not in ('', '1'):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def from_rank0(make, rank, world):
    """make() run on rank 0 only, its value sent to every process (a collective with several processes).

    A ValueError raised by make() is raised on every process, so that none waits for the others forever.
    """
    if world == 1:
        return make()
    import torch.distributed as dist
    box = [None]
    if rank == 0:
        try:
            box[0] = ('value', make())
        except ValueError as e:
            box[0] = ('error', str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == 'error':
        raise ValueError(value)
    return value
