"""Stopping a run at a checkpoint: signals, the time budget (--time_limit) and the agreement of processes.

A Stopper answers one question before each piece of work (a training step, a validation batch, the test):
may it start? Not after SIGINT or SIGTERM, nor when the work and the checkpoint write after it would overrun
the time budget. With several processes the answer is agreed by all of them, so that they stop at the same
batch with the same checkpoint.
"""
import signal
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

# main.py's exit statuses (docs/long-runs.md); reproduce.py reads a piece's from them.
DONE, STOPPED, BAD_INPUT, PAUSED = 0, 1, 2, 3  # PAUSED: --time_limit reached, checkpoint written, resumable

# Training batches between the points where several processes agree on stopping (the last batch is one too).
CHECK_EVERY = 25
# Seconds assumed for a checkpoint write until one has been timed; after that, twice the last write.
SAVE_GUESS = 5.0


class RunStopped(Exception):
    """The run stopped before its end (interrupt or a non-finite loss); the message says why and what next."""


class TimeUp(RunStopped):
    """The run stopped to stay within its time budget (--time_limit), with a checkpoint to resume from."""


class TimeBudget:
    """The seconds one invocation may run (--time_limit), counted on `clock` from the budget's creation."""

    def __init__(self, seconds, clock=time.monotonic):
        self.seconds, self.clock = seconds, clock
        self.start = clock()

    def left(self):
        return self.seconds - (self.clock() - self.start)


def format_duration(seconds):
    """5400 -> '90m', 3600 -> '1h', 95.5 -> '95.5s': a --time_limit value."""
    for unit, size in (('h', 3600), ('m', 60)):
        if seconds >= size and seconds % size == 0:
            return f'{seconds / size:g}{unit}'
    return f'{seconds:g}s'


class Stopper:
    """Whether the next piece of work may start, for one process or `world` processes together.

    budget: a TimeBudget or None (no limit). Its clock is the run's one clock: every duration the trainer
    measures is read from `clock`. `timing` holds the durations a plan needs (the last training step, the
    last whole validation, the last checkpoint write); the trainer keeps it in its checkpoint so that a
    resumed piece plans from its first step.
    """

    def __init__(self, budget=None, world=1, device='cpu'):
        self.budget, self.world, self.device = budget, world, device
        self.clock = budget.clock if budget is not None else time.monotonic
        self.signal = None   # the number of the signal received
        self.time_up = False
        self.timing = {'step': None, 'val': None, 'save': None}

    @property
    def stopping(self):
        return self.signal is not None or self.time_up

    @contextmanager
    def watching(self, log):
        """Inside the block SIGINT and SIGTERM only set self.signal: the work in hand finishes first."""
        def on_signal(signum, frame):
            if self.signal is None:  # a second Ctrl-C while saving: leave it to finish the write
                self.signal = signum
                log(f'{signal.Signals(signum).name} received: finishing this batch and writing the checkpoint')
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def short_of_time(self, seconds):
        """Whether `seconds` of work and the checkpoint write after it would overrun the budget (this process)."""
        if self.budget is None:
            return False
        save = SAVE_GUESS if self.timing['save'] is None else 2 * self.timing['save']
        return self.budget.left() < seconds + save

    def runs_out(self, seconds):
        """short_of_time, agreed by every process (a collective when world > 1 and a budget is set)."""
        if self.budget is None:
            return False
        self.time_up = self.short_of_time(seconds)
        if self.world > 1:
            self.agree(torch.tensor(-1, device=self.device), never=0)
        return self.time_up

    def agree(self, bad_step, never):
        """Across processes, at the same batch: (the first non-finite step or -1, whether a signal or the
        time budget stops the run); `never` is a step number no process reaches (the epoch's batch count).

        A collective: each process must call it at the same batch. Every process then stops together, even
        when the signal, the time-out or the non-finite loss reached only some of them.
        """
        never = torch.tensor(never, device=self.device)
        # One MAX all-reduce: minus the earliest bad step (never -> `never`), the signal number (0 = none)
        # and the time-out (0 or 1).
        flags = torch.stack([-torch.where(bad_step < 0, never, bad_step),
                             torch.tensor(self.signal or 0, device=self.device),
                             torch.tensor(int(self.time_up), device=self.device)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        first_bad, signum, self.time_up = -int(flags[0]), int(flags[1]), bool(flags[2])
        if signum:
            self.signal = signum
        first_bad = torch.tensor(-1 if first_bad == int(never) else first_bad, device=self.device)
        return first_bad, self.stopping

    def batch_stop(self):
        """A stop() for a loop of batches on one process (an evaluation): True after a signal, or when one
        more batch as long as the last and the checkpoint write would overrun the budget."""
        last = [None]

        def stop():
            now = self.clock()
            batch_seconds, last[0] = (0.0 if last[0] is None else now - last[0]), now
            self.time_up = self.short_of_time(batch_seconds)
            return self.stopping
        return stop

    def error(self, where, run_dir):
        """The exception that ends a run stopped `where` (its checkpoint written): TimeUp or RunStopped."""
        if self.time_up:
            limit = format_duration(self.budget.seconds)
            return TimeUp(f'time limit {limit}: stopped {where} with {max(self.budget.left(), 0):.0f}s left; '
                          f'checkpoint written. Resume with: python main.py --resume {run_dir} '
                          f'--time_limit {limit}')
        return RunStopped(f'{signal.Signals(self.signal).name}: stopped {where}; checkpoint written. '
                          f'Resume with: python main.py --resume {run_dir}')


def batches_to_check(b, world, n_batches):
    """Batches from batch b (the next to run) through the next point where the run may stop: 1 with one
    process; with several, the next check point of the epoch (every CHECK_EVERY-th batch, the last)."""
    if world == 1:
        return 1
    return min(-(-b // CHECK_EVERY) * CHECK_EVERY, n_batches - 1) - b + 1
