"""The run folder: what a run writes where, the checks of a folder given on the command line, and the
reading of a run (its checkpoint, config, results and progress) for --resume, --recommend and reproduce.py.

    <run dir>/config.json    every flag of the run             (main.py, at the start)
              checkpoint.pt  one dict: model, optimizer, RNGs, history, config  (trainer.py, at each validation)
              metrics.csv    one row per validation            (trainer.py, with each checkpoint)
              log.txt        the run's log                     (utils.RunLog)
              results.json   the test metrics and the summary  (main.py, at the end: the run has finished)

Checkpoints are not published, so the old formats to know are the project's own earlier ones, all here: configs
saved before a flag existed (OLD_CONFIG_DEFAULTS) and checkpoints from before --time_limit (OLD_CHECKPOINT_DEFAULTS).
"""
import csv
import datetime
import hashlib
import json
import os

import torch

import cli

CONFIG, CHECKPOINT, METRICS, LOG, RESULTS = 'config.json', 'checkpoint.pt', 'metrics.csv', 'log.txt', 'results.json'
RECOMMENDATIONS = 'recommendations.csv'  # --recommend's output unless --out is given
# Flags added after the first checkpoints were written, with the value those runs had.
OLD_CONFIG_DEFAULTS = {'model': 'diffurec', 'tensorboard': None, 'approximator': 'transformer', 'sample_steps': None,
                       'precision': 'fp32', 'preset': 'default', 'loss': 'full', 'negatives': 256,
                       'inner_size': None, 'block': 'preln', 'padding': 'left', 'init': 'xavier',
                       'test_both_protocols': False}
# Checkpoint entries added later: the planning durations of --time_limit (none timed yet).
OLD_CHECKPOINT_DEFAULTS = {'timing': {}}


def check_run_dir(run_dir, flag):
    """The folder given to `flag` (--resume, --recommend), checked before any work: a folder holding a checkpoint.
    ValueError (one line naming the flag) otherwise."""
    if not os.path.isdir(run_dir):
        raise ValueError(f'{flag} {run_dir}: no such run directory; pass the folder of a run (its --out_dir)')
    if not os.path.isfile(os.path.join(run_dir, CHECKPOINT)):
        raise ValueError(f'{flag} {run_dir}: no {CHECKPOINT} there; pass the folder of a run that validated '
                         f'or was interrupted')


def load_checkpoint(path):
    """Load a checkpoint with weights_only=True, completed by OLD_CHECKPOINT_DEFAULTS; a missing or corrupt file
    raises ValueError (one line)."""
    if not os.path.isfile(path):
        raise ValueError(f'no checkpoint at {path}; pass the run directory of a run that validated or was interrupted')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # corrupt, truncated, or not a checkpoint
        raise ValueError(f'checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); '
                         f'it is corrupt or not a checkpoint of this project') from None
    return {**OLD_CHECKPOINT_DEFAULTS, **state} if isinstance(state, dict) else state


def saved_config(run_dir, checkpoint):
    """The run's config as a dict: the checkpoint's, else (a checkpoint without one) its config.json, with the
    values of OLD_CONFIG_DEFAULTS for flags the run predates. ValueError (one line) when neither is readable."""
    config = checkpoint.get('config') if isinstance(checkpoint, dict) else None
    if config is None:
        try:
            with open(os.path.join(run_dir, CONFIG)) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f'{run_dir}: the checkpoint holds no config and {CONFIG} cannot be read '
                             f'({type(e).__name__})') from None
    return {**OLD_CONFIG_DEFAULTS, **config}


def finished(run_dir):
    """Whether the run has finished (its results are written)."""
    return os.path.isfile(os.path.join(run_dir, RESULTS))


def check_out_dir(cfg):
    """A given --out_dir that holds a run already is refused, unless that run is resumed."""
    if cfg.out_dir and not cfg.resume and os.path.exists(os.path.join(cfg.out_dir, CHECKPOINT)):
        raise ValueError(f'--out_dir {cfg.out_dir} holds a run already; continue it with --resume {cfg.out_dir} '
                         f'or choose another --out_dir')


def make_run_dir(cfg):
    """The run's folder, made: --out_dir, or runs/<dataset>/<timestamp> (with a suffix if that exists)."""
    check_out_dir(cfg)
    path = cfg.out_dir
    if not path:
        stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
        path = os.path.join('runs', cfg.dataset, stamp)
        suffix = 1
        while os.path.exists(path):
            path, suffix = os.path.join('runs', cfg.dataset, f'{stamp}-{suffix}'), suffix + 1
    return cli.writable_dir(path, '--out_dir')


def recommendations_file(run_dir, out=None):
    """Where --recommend RUN_DIR writes: --out if given, else RUN_DIR/recommendations.csv."""
    return out or os.path.join(run_dir, RECOMMENDATIONS)


def log_copy_name(dataset, run_dir):
    """Name of the run's log copy in --log_file: <dataset>_<parent folder>_<run folder>_<hash>.log. The hash (8 hex
    digits of the absolute run_dir) keeps apart run dirs whose two last names agree, e.g. the seed_<S> folders
    of two --seeds experiments, so each copy holds one run's log."""
    path = os.path.abspath(run_dir)
    digest = hashlib.sha1(path.encode()).hexdigest()[:8]
    return f'{dataset}_{os.path.basename(os.path.dirname(path))}_{os.path.basename(path)}_{digest}.log'


def read_json(path):
    with open(path) as f:
        return json.load(f)


def progress(path, smoke_ok=False):
    """What a run folder holds: a dict with status 'finished' (results.json, of a smoke run only when
    smoke_ok), 'unfinished' (checkpoint.pt or metrics.csv) or 'new'; epoch (epochs trained), max_epochs,
    eval_interval, epoch_seconds, validations (Trainer.history rows), results (results.json or None)."""
    summary = {'status': 'new', 'epoch': 0, 'max_epochs': None, 'eval_interval': None, 'epoch_seconds': [],
               'validations': [], 'results': None}
    results_path, checkpoint_path = os.path.join(path, RESULTS), os.path.join(path, CHECKPOINT)
    metrics_path = os.path.join(path, METRICS)
    results = read_json(results_path) if os.path.exists(results_path) else None
    if results is not None and (smoke_ok or not results.get('smoke')):
        summary.update(status='finished', results=results, epoch=results['epochs_run'],
                       epoch_seconds=results['epoch_seconds'], validations=results['validations'],
                       max_epochs=results['config']['epochs'], eval_interval=results['config']['eval_interval'])
        return summary
    if os.path.exists(checkpoint_path):
        try:
            state = load_checkpoint(checkpoint_path)
        except ValueError:  # unreadable: main.py --resume will say so; metrics.csv still tells the progress
            state = None
        if state is not None:
            summary.update(status='unfinished', epoch=state['epoch'], epoch_seconds=state['epoch_seconds'],
                           validations=state['history'], max_epochs=state['config']['epochs'],
                           eval_interval=state['config']['eval_interval'])
            return summary
    if os.path.exists(metrics_path):  # written with every checkpoint
        with open(metrics_path, newline='') as f:
            rows = [{k: float(v) if k not in ('kept',) and v not in ('', None) else v for k, v in row.items()}
                    for row in csv.DictReader(f)]
        summary.update(status='unfinished', validations=rows, epoch=int(rows[-1]['epoch']) + 1 if rows else 0)
    return summary
