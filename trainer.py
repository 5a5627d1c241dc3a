"""The training loop: training, validation and model selection, early stopping, and checkpoints.

One Trainer runs one experiment: train for up to `epochs`, validate after epoch e when e != 0 and
e % eval_interval == 0, keep the model that improved a validation metric, stop after `patience`
validations without improvement, then test the kept model.
Everything needed to continue a run lives in one checkpoint dict, written atomically.
"""
import copy
import csv
import math
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

import dist_util
import rundir
import utils
from metrics import evaluate, format_metrics, metric_names
from board import open_board
from stopping import CHECK_EVERY, RunStopped, Stopper, batches_to_check


# ----------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------

def build_optimizer(cfg, params):
    if cfg.optimizer.lower() == 'adam':
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer.lower() == 'sgd':
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum or 0.0)
    raise ValueError(f'unknown optimizer {cfg.optimizer!r}; choose Adam or SGD')


def precision_context(device, precision):
    """Training under bf16 autocast for --precision bf16; a no-op for fp32."""
    if precision == 'bf16':
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


# The trainer's progress, as the checkpoint holds it (beside the model, optimizer, RNG and sampler states).
PROGRESS = ('kept_epoch', 'epoch', 'batch', 'epoch_elapsed', 'epoch_loss', 'best', 'best_epoch', 'bad_count',
            'stopped_early', 'epoch_seconds', 'epoch_losses', 'history')


class Trainer:
    """Runs training, validation, early stopping and testing for one model and one dataset.

    model: a DiffuRec or SASRec (or a DistributedDataParallel around one); samples: data.build_samples
    output, with the model's own training samples; histories: {split: data.histories(data, split)}, the
    items --exclude_history leaves out of each ranking;
    cfg: the main.py namespace; run_dir: where checkpoints and metrics go (written by rank 0 only).
    budget: a TimeBudget, or None: before each step, validation and the test the trainer checks that the work
    and the checkpoint write after it fit in the time left, else writes the checkpoint and raises TimeUp.
    With cfg.tensorboard, rank 0 logs the per-epoch and validation scalars there (board.Board) during fit().
    """

    def __init__(self, model, cfg, samples, run_dir, device, log, rank=0, world=1, data_checksum='',
                 histories=None, budget=None):
        self.model = model
        self.module = model.module if hasattr(model, 'module') else model
        self.cfg, self.samples, self.run_dir, self.device = cfg, samples, run_dir, device
        self.log, self.rank, self.world = log, rank, world
        self.data_checksum = data_checksum
        self.histories = histories or {}  # split -> each row's history, for --exclude_history
        self.optimizer = build_optimizer(cfg, self.module.parameters())
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=cfg.decay_step, gamma=cfg.gamma)
        n_train = len(samples['train'][1])
        self.n_batches = math.ceil(n_train / cfg.batch_size)
        if cfg.limit_train_batches:
            self.n_batches = min(self.n_batches, cfg.limit_train_batches)
        self.stopper = Stopper(budget, world, device)
        self.clock = self.stopper.clock
        # Progress (PROGRESS, saved in the checkpoint): the next (epoch, batch) to run, the bests so far.
        self.epoch, self.batch = 0, 0
        self.epoch_elapsed, self.epoch_loss = 0.0, 0.0
        self.best, self.best_epoch = {}, {}  # metric -> best validation value so far, and its epoch
        self.kept_state, self.kept_epoch = None, None  # the kept model (state dict on CPU) and its epoch
        self.bad_count, self.stopped_early = 0, False
        self.epoch_seconds, self.epoch_losses = [], []
        self.history = []  # one dict per validation: epoch, loss, seconds, metrics
        self.resumed = False
        self._stop_after_epoch = False
        self.board = None

    # -- checkpoint state ----------------------------------------------------------------------------------
    def state_dict(self):
        return {
            'model': self.module.state_dict(),
            'kept_model': self.kept_state,
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(),
            'sampler': self.module.sampler.state_dict() if self.module.sampler is not None else None,
            'rng': utils.rng_state(),
            **{key: getattr(self, key) for key in PROGRESS},
            'config': utils.config_dict(self.cfg),
            'data_checksum': self.data_checksum,
            'n_items': self.module.n_items,
            'timing': dict(self.stopper.timing),
        }

    def load_state_dict(self, state):
        self.module.load_state_dict(state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        if state['sampler'] is not None:
            self.module.sampler.load_state_dict(state['sampler'])
        for key in PROGRESS:
            setattr(self, key, state[key])
        self.kept_state = state['kept_model']
        self.stopper.timing.update(state['timing'])
        utils.set_rng_state(state['rng'])
        self.resumed = True

    def save(self):
        if self.board is not None:  # the board holds at least what the checkpoint knows
            self.board.flush()
        if self.rank == 0:
            begun = self.clock()
            utils.write_atomic(os.path.join(self.run_dir, rundir.CHECKPOINT), lambda f: torch.save(self.state_dict(), f),
                               binary=True)
            self.stopper.timing['save'] = self.clock() - begun

    # -- the loop ------------------------------------------------------------------------------------------
    def fit(self):
        """Train until `epochs` or early stopping. Raises RunStopped on an interrupt or a non-finite loss,
        TimeUp when the budget runs out; before the test when the test would not fit in the time left
        (a resumed run then only tests)."""
        if self.cfg.tensorboard and self.rank == 0:
            self.board = open_board(self.cfg.tensorboard, len(self.epoch_losses) if self.resumed else None, self.log)
        try:
            with self.stopper.watching(self.log):
                self._fit()
        finally:
            if self.board is not None:
                self.board.close()

    def _fit(self):
        while self.epoch < self.cfg.epochs and not self.stopped_early:
            if self.batch < self.n_batches:
                batches = batches_to_check(self.batch, self.world, self.n_batches)
                if self.stopper.runs_out(batches * (self.stopper.timing['step'] or 0.0)):
                    self._stop()
                self.train_epoch()
                if self._stop_after_epoch:  # resumes with this epoch's validation, if one is due
                    self._stop()
            epoch = self.epoch
            # Advance first, so that a checkpoint written by validate() resumes at the next epoch.
            self.epoch, self.batch = epoch + 1, 0
            self.epoch_elapsed, self.epoch_loss = 0.0, 0.0
            if self.validation_due(epoch):
                self.validate(epoch)
        test_seconds = self._test_seconds()
        if self.stopper.runs_out(test_seconds):  # the test is never cut: it would be lost whole
            self._stop(f'before the test (about {test_seconds:.0f}s)')

    def validation_due(self, epoch):
        return epoch != 0 and epoch % self.cfg.eval_interval == 0

    def _stop(self, where=None):
        """Write the checkpoint and raise TimeUp (the budget ran out) or RunStopped (a signal)."""
        where = where or f'at epoch {self.epoch} batch {self.batch}'
        if self.stopper.time_up:
            self.log(f'time limit: stopping {where}, writing the checkpoint')
        self.save()
        raise self.stopper.error(where, self.run_dir)

    def _test_seconds(self):
        """Estimated seconds of the test phase: the last validation's, scaled by the reverse steps, three times
        over with --long_head (its groups cover the users twice more). 0 when no validation was timed."""
        if self.stopper.timing['val'] is None:
            return 0.0
        steps = {split: self.sample_steps(split) or self.cfg.diffusion_steps for split in ('val', 'test')}
        return self.stopper.timing['val'] * steps['test'] / steps['val'] * (3 if self.cfg.long_head else 1)

    def train_epoch(self):
        """Train the rest of epoch self.epoch from batch self.batch; the order is one seeded permutation."""
        labels = self.samples['train'][1]
        generator = torch.Generator().manual_seed(self.cfg.random_seed * 100003 + self.epoch)
        perm = torch.randperm(len(labels), generator=generator).to(self.device)
        self.model.train()
        bad_step = torch.tensor(-1, device=self.device)
        # One process continues the epoch's running sum from its earlier pieces: a cut epoch then adds its
        # losses in the same order as an uninterrupted one, and its mean is the same to the last bit.
        loss_sum = torch.tensor(self.epoch_loss if self.world == 1 else 0.0, dtype=torch.float64, device=self.device)
        start = step_began = self.clock()
        bar = tqdm(range(self.batch, self.n_batches), desc=f'epoch {self.epoch}', leave=False,
                   disable=self.rank != 0, dynamic_ncols=True, initial=self.batch, total=self.n_batches)
        for b in bar:
            loss, weighted_sum = self.train_step(perm, b)
            # record
            loss_sum += weighted_sum
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), b, bad_step)
            self.batch = b + 1
            now = self.clock()
            self.stopper.timing['step'], step_began = now - step_began, now
            # check
            bad_step, stopping = self._check(b, bad_step, loss, bar)
            if stopping and self.batch < self.n_batches:
                self._finish_partial_epoch(loss_sum, start)
                self._stop()
        self._stop_after_epoch = stopping  # the epoch's bookkeeping below is done first, then fit() stops
        self._finish_partial_epoch(loss_sum, start)
        lr = self.optimizer.param_groups[0]['lr']  # the rate this epoch trained with
        self.scheduler.step()
        self.epoch_seconds.append(round(self.epoch_elapsed, 3))
        mean_loss = self.epoch_loss / self.n_batches
        self.epoch_losses.append(mean_loss)
        self.log(f'epoch {self.epoch:4d}  loss {mean_loss:.4f}  {self.epoch_elapsed:.1f}s')
        if self.board is not None:
            self.board.epoch(self.epoch, mean_loss, lr, self.epoch_elapsed)

    def train_step(self, perm, b):
        """Forward, backward and optimizer step on this process's slice of global batch b.
        Returns (the loss stepped on, detached; this slice's share of the epoch's loss sum, float64)."""
        cfg = self.cfg
        inputs, labels = self.samples['train']
        batch = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        # the global batch's weight in the mean: its samples (DiffuRec) or real target positions (SASRec)
        global_size = self.module.loss_units(labels[batch])
        rows, weight = train_rows(batch, self.rank, self.world)
        seq, label = inputs[rows].to(self.device, non_blocking=True), labels[rows].to(self.device, non_blocking=True)
        with precision_context(self.device, cfg.precision):
            _, losses, t = self.model(seq, label)
        # Sum over this slice / global batch, times world: DDP's gradient mean then equals the global mean.
        loss = losses.sum() * (weight * self.world / global_size)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if cfg.update_lossaware:
            fed = len(rows) if weight else 0  # a zero-weight stand-in row feeds the sampler nothing
            self._feed_sampler(t[:fed], losses[:fed])
        return loss.detach(), losses.detach().sum().double() * (weight * self.world / global_size)

    def _check(self, b, bad_step, loss, bar):
        """After batch b: (first non-finite step or -1, whether to stop now). Raises RunStopped on a non-finite
        loss. Several processes decide together, at check points only: a lone process would wait forever."""
        check = b % CHECK_EVERY == 0 or self.batch == self.n_batches
        if self.batch < self.n_batches and (self.world == 1 or check):  # the epoch's end is fit()'s to judge
            batches = batches_to_check(self.batch, self.world, self.n_batches)
            self.stopper.time_up = self.stopper.short_of_time(batches * self.stopper.timing['step'])
        stopping = self.stopper.stopping
        if self.world > 1:
            bad_step, stopping = self.stopper.agree(bad_step, self.n_batches) if check else (bad_step, False)
        if check or stopping:
            if int(bad_step) >= 0:
                raise RunStopped(f'non-finite loss at epoch {self.epoch} step {int(bad_step)}; stopped. '
                                 f'The last good checkpoint (if any) is in {self.run_dir}; try a lower --lr')
            bar.set_postfix(loss=f'{loss.float().item():.4f}')
        return bad_step, stopping

    def _finish_partial_epoch(self, loss_sum, start):
        """Fold this piece of the epoch (called once per train_epoch) into epoch_loss and epoch_elapsed."""
        if self.world > 1:  # this piece's sums, averaged over the processes, added to the earlier pieces'
            dist.all_reduce(loss_sum)
            self.epoch_loss += float(loss_sum / self.world)
        else:  # the running sum, which began from the earlier pieces'
            self.epoch_loss = float(loss_sum)
        self.epoch_elapsed += self.clock() - start

    def _feed_sampler(self, t, losses):
        """--update_lossaware: give the loss-aware sampler every sample's loss (from every process)."""
        t, losses = t.detach(), losses.detach().float()
        if self.world > 1:
            t, losses = dist_util.all_gather_varlen(t), dist_util.all_gather_varlen(losses)
        if hasattr(self.module.sampler, 'update_with_all_losses'):
            self.module.sampler.update_with_all_losses(t.cpu().numpy(), losses.cpu().numpy())

    def evaluate_split(self, split, model=None, stop=None, topk_items=None, data=None, exclude_history=None):
        """Metrics of `model` (default: the current one) on a split of self.samples, or on `data`
        (inputs, labels, histories) under the name `split` (the --long_head groups), with the run's settings.
        With exclude_history (default --exclude_history) each row's history (self.histories[split]) is left out
        of its ranking."""
        if exclude_history is None:
            exclude_history = self.cfg.exclude_history
        if data is None:
            inputs, labels = self.samples[split]
            histories = self.histories.get(split)
        else:
            inputs, labels, histories = data
        return evaluate(model or self.module, inputs, labels, sorted(self.cfg.metric_ks), self.cfg.batch_size,
                        self.device, metric_average=self.cfg.metric_average,
                        histories=histories if exclude_history else None,
                        precision=self.cfg.precision, limit_batches=self.cfg.limit_eval_batches,
                        desc=split, rank=self.rank, world=self.world, stop=stop,
                        sample_steps=self.sample_steps(split), topk_items=topk_items)

    def sample_steps(self, split):
        """Reverse steps for a split: --eval_sample_steps for validation if given, else --sample_steps (None = T)."""
        if split == 'val' and self.cfg.eval_sample_steps is not None:
            return self.cfg.eval_sample_steps
        return self.cfg.sample_steps

    def validate(self, epoch):
        """Validate the model trained through `epoch`: update the bests and the kept model, count bad
        validations, write the checkpoint and metrics.csv."""
        # A validation cut short is redone whole: do not start one the time left cannot hold.
        if self.stopper.runs_out(self.stopper.timing['val'] or 0.0):
            self.epoch, self.batch = epoch, self.n_batches
            self._stop(f'before the validation of epoch {epoch} (about {self.stopper.timing["val"] or 0:.0f}s)')
        rng_before = utils.rng_state()
        begun = self.clock()
        # With several processes a signal or time-out is acted on at the next training check point instead:
        # stopping here would have to be agreed at every batch.
        metrics = self.evaluate_split('val', stop=self.stopper.batch_stop() if self.world == 1 else None)
        if metrics is None:  # interrupted: the checkpoint resumes with this validation, from the same state
            utils.set_rng_state(rng_before)
            self.epoch, self.batch = epoch, self.n_batches
            self._stop(f'during the validation of epoch {epoch}')
        seconds = self.stopper.timing['val'] = self.clock() - begun
        improved, kept, self.bad_count, self.stopped_early = selection_step(
            metrics, self.best, self.cfg.select_metric, self.bad_count, self.cfg.patience)
        for m in improved:
            self.best[m], self.best_epoch[m] = metrics[m], epoch
        if kept:
            self.kept_state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
            self.kept_epoch = epoch
        row = {'epoch': epoch, 'loss': round(self.epoch_losses[-1], 6) if self.epoch_losses else None,
               'seconds': round(seconds, 2), **metrics, 'kept': kept}
        self.history.append(row)
        self.log(f'valid epoch {epoch}: ' + format_metrics(metrics) + f'  ({seconds:.1f}s)'
                 + ('  kept' if kept else f'  bad {self.bad_count}/{self.cfg.patience}'))
        if self.board is not None:
            self.board.validation(epoch, metrics, seconds)
        self.save()
        if self.rank == 0:
            write_metrics_csv(self.run_dir, self.history, self.cfg.metric_ks)

    def final_model(self):
        """The model to test: the kept copy, or the final model when no validation kept one."""
        if self.kept_state is None:
            return self.module
        model = copy.deepcopy(self.module)
        model.load_state_dict(self.kept_state)
        return model

    def summary(self):
        """What results.json records of the training: bests, selection, epochs and their losses and times."""
        return {'best_valid': self.best, 'best_epoch': self.best_epoch, 'kept_epoch': self.kept_epoch,
                'selection': kept_selection(self.history, self.kept_epoch, self.cfg.select_metric,
                                            self.cfg.metric_ks),
                'epochs_run': len(self.epoch_seconds), 'stopped_early': self.stopped_early,
                'epoch_seconds': self.epoch_seconds, 'epoch_losses': self.epoch_losses,
                'validations': self.history}


def train_rows(batch, rank, world):
    """(rows, weight): the slice of a global batch (rows of the training samples) that process `rank` of
    `world` trains on, and the weight of its loss.

    A last batch with fewer rows than processes leaves some slices empty; such a process trains on the
    batch's first row with weight 0, because DistributedDataParallel needs every process to run forward and
    backward at every step. Its gradient is then zero and the global mean is unchanged.
    """
    rows = batch.tensor_split(world)[rank]
    if len(rows) == 0:
        return batch[:1], 0.0
    return rows, 1.0


def write_metrics_csv(run_dir, history, metric_ks):
    """<run_dir>/metrics.csv: one row per validation of `history` (epoch, loss, seconds, metrics, kept)."""
    fields = ['epoch', 'loss', 'seconds'] + metric_names(sorted(metric_ks)) + ['kept']

    def write(f):
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)
    utils.write_atomic(os.path.join(run_dir, rundir.METRICS), write)


def selection_step(metrics, best, select_metric, bad_count, patience):
    """The reference's model selection after one validation, as a pure function.

    metrics: this validation's; best: the best value of each metric so far (absent = none yet).
    Returns (improved, kept, bad_count, stop): the metrics that beat their best; whether the model is kept
    (one of them improved, or select_metric among them when it is set); the validations without a kept
    model in a row; whether they reached `patience`, which stops training.
    """
    improved = [m for m, v in metrics.items() if v > best.get(m, -math.inf)]
    kept = bool(improved if not select_metric else select_metric in improved)
    bad_count = 0 if kept else bad_count + 1
    return improved, kept, bad_count, not kept and bad_count >= patience


def kept_selection(history, kept_epoch, select_metric, ks):
    """results.json 'selection': the rule that chose the kept model, its epoch and its validation metrics.

    metric: select_metric, or 'any' (the reference: kept whenever any metric improves); epoch: the kept
    epoch (None when no validation ran); valid: the metrics of that one validation ({} when none).
    """
    row = next((r for r in history if r['epoch'] == kept_epoch), None)
    valid = {m: row[m] for m in metric_names(ks)} if row is not None else {}
    return {'metric': select_metric or 'any', 'epoch': kept_epoch, 'valid': valid}
