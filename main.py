"""DiffuRec: train, validate and test on a sequential-recommendation dataset.

    python main.py --dataset amazon_beauty          # the paper's experiment
    python main.py --dataset synthetic              # a minute on a CPU, no download

Every flag of the authors' script keeps its name and default; `python main.py --help` lists them all.
"""
import argparse
import datetime
import hashlib
import math
import os
import platform
import sys
import time
import warnings

import torch

import utils
from board import require_tensorboard
from data import (DEFAULT_DATA_DIR, DataError, build_samples, check_available, group_users, histories,
                  load_dataset, load_item_categories, samples_checksum, sequence_samples)
from metrics import diversity_metrics, metric_names, metrics_table
from model import MODELS, build_model
from plots import plot_curves
from recommend import recommend
from stopping import RunStopped, TimeBudget, TimeUp
from trainer import Trainer, check_run_dir, load_checkpoint
from utils import duration, finite_float, positive_int

METRIC_CHOICES = ('batch', 'user')


def build_parser():
    p = utils.ArgumentParser(prog='main.py',
                             description='DiffuRec (Li, Sun, Li, TOIS 2024): a diffusion model for sequential '
                                         'recommendation. Defaults reproduce the authors\' code.',
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    B = argparse.BooleanOptionalAction
    data = p.add_argument_group('data')
    data.add_argument('--dataset', default='amazon_beauty',
                      help='amazon_beauty, toys, ml-1m, steam, synthetic, or a folder name under --data_dir')
    data.add_argument('--data_dir', default=DEFAULT_DATA_DIR, help='folder holding <dataset>/dataset.pkl')
    data.add_argument('--max_len', type=positive_int, default=50, help='history length L (older items are cut)')

    model = p.add_argument_group('model')
    model.add_argument('--model', default='diffurec', choices=list(MODELS),
                       help='diffurec, or sasrec: the SASRec baseline trained with full cross-entropy, whose '
                            'defaults for flags not given are ' + ', '.join(f'{k} {v}' for k, v in SASREC_PRESET.items()))
    model.add_argument('--hidden_size', type=positive_int, default=128, help='embedding size d')
    model.add_argument('--heads', type=positive_int, default=4, help='attention heads (the reference fixes 4)')
    model.add_argument('--num_blocks', type=positive_int, default=4, help='transformer blocks of the Approximator')
    model.add_argument('--dropout', type=finite_float, default=0.1, help='dropout inside the Approximator')
    model.add_argument('--emb_dropout', type=finite_float, default=0.3,
                       help='dropout on the item embeddings of the history')
    model.add_argument('--hidden_act', default='gelu', choices=['gelu', 'relu'],
                       help='feed-forward activation (gelu is the tanh approximation, as in the reference)')
    model.add_argument('--diffusion_steps', type=positive_int, default=32, help='diffusion steps T')
    model.add_argument('--noise_schedule', default='trunc_lin',
                       choices=['trunc_lin', 'linear', 'pw_lin', 'cosine', 'sqrt', 'trunc_cos'], help='beta schedule')
    model.add_argument('--schedule_sampler_name', default='lossaware', choices=['lossaware', 'uniform', 'fixstep'],
                       help='timestep sampler for training')
    model.add_argument('--lambda_uncertainty', type=finite_float, default=0.001,
                       help='mean and std of the uncertainty weight lambda ~ N(delta, delta^2)')
    model.add_argument('--rescale_timesteps', action=B, default=True, help='feed t * 1000 / T to the time embedding')
    model.add_argument('--attention_mask', default='query', choices=['query', 'key', 'causal'],
                       help='query: the reference quirk (padded query rows masked); key: mask padded keys; '
                            'causal: key plus a causal mask')
    model.add_argument('--rank_padding', action=B, default=True,
                       help='the padding row takes part in the loss and the ranking (reference quirk)')
    model.add_argument('--rounding', default='inner', choices=['inner', 'routing'],
                       help='scores: inner product with the item table, or minus the squared distance')
    model.add_argument('--approximator', default='transformer', choices=['transformer', 'gru', 'mlp'],
                       help='ablations: gru = one GRU layer, mlp = one linear layer, both on the last position '
                            'of the same noisy input (the transformer flags do not apply to them)')

    train = p.add_argument_group('training')
    train.add_argument('--epochs', type=positive_int, default=500, help='maximum number of epochs')
    train.add_argument('--batch_size', type=positive_int, default=512, help='batch size (global, all processes)')
    train.add_argument('--optimizer', default='Adam', choices=['Adam', 'SGD', 'adam', 'sgd'], help='optimizer')
    train.add_argument('--lr', type=finite_float, default=0.001, help='learning rate')
    train.add_argument('--weight_decay', type=finite_float, default=0.0, help='weight decay')
    train.add_argument('--momentum', type=finite_float, default=None, help='SGD momentum (None = 0)')
    train.add_argument('--decay_step', type=positive_int, default=100, help='StepLR period in epochs')
    train.add_argument('--gamma', type=finite_float, default=0.1, help='StepLR factor')
    train.add_argument('--loss_lambda', type=finite_float, default=0.001,
                       help='kept for compatibility: the reference objective never uses it')
    train.add_argument('--update_lossaware', action='store_true',
                       help='feed per-sample losses to the lossaware sampler (the reference never does)')
    train.add_argument('--random_seed', type=utils.seed, default=1997, help='seed of every generator')
    train.add_argument('--precision', default='fp32', choices=['fp32', 'bf16'],
                       help='bf16: training under autocast, evaluation with a bf16 copy of the approximator')
    train.add_argument('--compile', action='store_true', help='torch.compile the model (CUDA)')

    ev = p.add_argument_group('evaluation and model selection')
    ev.add_argument('--eval_interval', type=positive_int, default=20, help='validate after epoch e when e != 0 and e %% this == 0')
    ev.add_argument('--patience', type=positive_int, default=5, help='validations without improvement before stopping')
    ev.add_argument('--metric_ks', type=positive_int, nargs='+', default=[5, 10, 20], help='cut-offs K of HR@K, NDCG@K')
    ev.add_argument('--metric_average', default='batch', choices=METRIC_CHOICES,
                    help='batch: mean of per-batch means (reference); user: exact mean over users')
    ev.add_argument('--sample_steps', type=int, default=None,
                    help='fast sampling: reverse process over K evenly respaced of the T steps, 1 <= K <= T '
                         '(validation and test; default T)')
    ev.add_argument('--eval_sample_steps', type=int, default=None,
                    help='K for validation only (default: --sample_steps)')
    ev.add_argument('--exclude_history', action='store_true', help='do not rank the items of the input sequence')
    ev.add_argument('--select_metric', default=None,
                    help='keep the model that is best on this one metric (e.g. NDCG@10) instead of any metric')
    ev.add_argument('--strict', action='store_true',
                    help='all corrections at once: --attention_mask key --no-rank_padding --exclude_history '
                         '--metric_average user --select_metric NDCG@10 --update_lossaware (one of these given '
                         'with another value is an error)')
    ev.add_argument('--long_head', action='store_true', help='also test hot/cold and length groups of users')
    ev.add_argument('--diversity_measure', action='store_true',
                    help='category diversity of the test top-K (needs --category_file)')
    ev.add_argument('--category_file', default=None, metavar='PATH',
                    help='JSON or CSV mapping original item id -> category: adds category diversity to results.json')
    ev.add_argument('--epoch_time_avg', action='store_true', help='report the mean epoch time')

    run = p.add_argument_group('run')
    run.add_argument('--device', default='auto', help='auto (cuda if available), cpu, cuda or cuda:N')
    run.add_argument('--num_gpu', type=positive_int, default=1, help='GPUs; above 1 use torchrun (see docs/long-runs.md)')
    run.add_argument('--out_dir', default=None, help='run directory (default runs/<dataset>/<timestamp>)')
    run.add_argument('--log_file', default='log/',
                     help='folder that also receives a copy of the log, named <dataset>_<parent folder>_<run folder>_'
                          '<hash of the run dir>.log, one per run dir ("" for none)')
    run.add_argument('--description', default='Diffu_norm_score', help='free text stored with the run')
    run.add_argument('--limit_train_batches', type=positive_int, default=None, help='smoke runs: batches per epoch')
    run.add_argument('--limit_eval_batches', type=positive_int, default=None, help='smoke runs: batches per evaluation')
    run.add_argument('--resume', default=None, metavar='RUN_DIR', help='continue the run in RUN_DIR')
    run.add_argument('--time_limit', type=duration, default=None, metavar='T',
                     help='stop before T (seconds, or 90s, 9m, 1.5h) with a checkpoint and exit status 3, to be '
                          'continued with --resume; the limit is per invocation: give it again with --resume')
    run.add_argument('--tensorboard', default=None, metavar='DIR',
                     help='also log the training loss, learning rate and validation metrics per epoch for '
                          'TensorBoard in DIR (needs the tensorboard package)')
    run.add_argument('--seeds', type=utils.seed, nargs='+', default=None, metavar='S',
                     help='one run per seed in <out_dir>/seed_<S>/, then mean +- std in <out_dir>/aggregate.json')

    rec = p.add_argument_group('recommendations from a trained run')
    rec.add_argument('--recommend', default=None, metavar='RUN_DIR',
                     help='write every user\'s top --topk items (original ids) from the run in RUN_DIR; no training. '
                          'It samples with the run\'s --sample_steps and --precision unless they are given')
    rec.add_argument('--topk', type=positive_int, default=20, help='items per user for --recommend')
    rec.add_argument('--out', default=None, metavar='PATH',
                     help='CSV for --recommend (default RUN_DIR/recommendations.csv)')
    return p


# `--dataset synthetic` is for trying the pipeline in minutes on a CPU: a smaller model and a shorter
# schedule, used for every flag not given on the command line.
# `--model sasrec`: SASRec's defaults from the literature (docs/sasrec.md gives the sources), used for every flag
# not given on the command line. Its validation is one forward pass per user, cheap enough to run often.
SASREC_PRESET = dict(hidden_size=64, num_blocks=2, heads=1, dropout=0.2, emb_dropout=0.2, hidden_act='relu',
                     batch_size=128, epochs=200, eval_interval=2, patience=5)
# Flags that configure the diffusion alone; given with --model sasrec they are an error, not silently ignored.
DIFFUREC_ONLY = ('diffusion_steps', 'noise_schedule', 'schedule_sampler_name', 'lambda_uncertainty',
                 'rescale_timesteps', 'attention_mask', 'rounding', 'approximator', 'sample_steps',
                 'eval_sample_steps', 'update_lossaware')

SYNTHETIC_PRESET = dict(hidden_size=64, num_blocks=2, batch_size=256, epochs=20, eval_interval=5, patience=2)

STRICT = dict(attention_mask='key', rank_padding=False, exclude_history=True, metric_average='user',
              select_metric='NDCG@10', update_lossaware=True)


def check_config(cfg):
    """Reject impossible flag values before any work: raises ValueError with one line naming the fix."""
    if cfg.hidden_size % cfg.heads:
        raise ValueError(f'--hidden_size {cfg.hidden_size} is not divisible by --heads {cfg.heads}')
    for name in ('dropout', 'emb_dropout'):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ValueError(f'--{name} must lie in [0, 1), got {getattr(cfg, name)}')
    for name in ('lr', 'gamma'):
        if not (getattr(cfg, name) > 0 and math.isfinite(getattr(cfg, name))):
            raise ValueError(f'--{name} must be a positive number, got {getattr(cfg, name)}')
    if not (cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay)):
        raise ValueError(f'--weight_decay must be >= 0, got {cfg.weight_decay}')
    if cfg.momentum is not None and not 0 <= cfg.momentum < 1:
        raise ValueError(f'--momentum must lie in [0, 1), got {cfg.momentum}')
    if not (cfg.lambda_uncertainty >= 0 and math.isfinite(cfg.lambda_uncertainty)):
        raise ValueError(f'--lambda_uncertainty must be >= 0, got {cfg.lambda_uncertainty}')
    from diffurec import get_named_beta_schedule
    get_named_beta_schedule(cfg.noise_schedule, cfg.diffusion_steps)  # raises for a schedule invalid at this T
    for name in ('sample_steps', 'eval_sample_steps'):
        steps = getattr(cfg, name)
        if steps is not None and not 1 <= steps <= cfg.diffusion_steps:
            raise ValueError(f'--{name} must lie in [1, {cfg.diffusion_steps}] (--diffusion_steps), got {steps}')
    if cfg.select_metric and cfg.select_metric not in metric_names(cfg.metric_ks):
        raise ValueError(f'--select_metric {cfg.select_metric} is not one of {", ".join(metric_names(cfg.metric_ks))}')
    if cfg.diversity_measure and not cfg.category_file:
        raise ValueError('--diversity_measure needs --category_file PATH (JSON or CSV: original item id -> category)')


def set_presets(parser, argv):
    """The defaults of --model sasrec and --dataset synthetic on `parser`, for the flags argv does not give."""
    known, _ = parser.parse_known_args(argv)
    if known.model == 'sasrec':
        parser.set_defaults(**SASREC_PRESET)
    if known.dataset == 'synthetic':  # after SASRec's: the short schedule wins
        parser.set_defaults(**SYNTHETIC_PRESET)
    return parser


def parse_config(argv=None):
    """Flags -> config namespace. With --resume, the run's saved config, after checking the given flags."""
    parser = set_presets(build_parser(), argv)
    cfg = normalise(parser.parse_args(argv))
    given = given_flags(parser, argv)
    utils.check_not_empty(parser, cfg, EMPTY_MEANS)
    misplaced = sorted(RECOMMEND_ONLY & given) if not cfg.recommend else []
    if misplaced:
        raise ValueError(f'--{misplaced[0]} is for --recommend RUN_DIR; add --recommend or drop --{misplaced[0]}')
    if cfg.strict:
        check_strict(cfg, given)
    if cfg.resume:
        return resumed_config(cfg, given)
    if cfg.recommend:  # None: the trained run's own value (recommend.py), unless given
        for name in RECOMMEND_FROM_RUN - given:
            setattr(cfg, name, None)
    if cfg.model == 'sasrec':
        misplaced = [name for name in DIFFUREC_ONLY if name in given]
        if misplaced:
            raise ValueError(f'--{misplaced[0]} configures DiffuRec\'s diffusion and does not apply to --model sasrec; '
                             f'drop it')
    if cfg.strict:
        for key, value in STRICT.items():
            if not (cfg.model == 'sasrec' and key in DIFFUREC_ONLY):  # SASRec's attention is causal already
                setattr(cfg, key, value)
    return cfg


def normalise(cfg):
    """One spelling for values that argparse accepts in several (in place; returns cfg): the optimizer's
    canonical case, metric_ks sorted without repeats. Runs are stored, compared and resumed in this form."""
    cfg.optimizer = {'adam': 'Adam', 'sgd': 'SGD'}.get(cfg.optimizer.lower(), cfg.optimizer)
    cfg.metric_ks = sorted(set(cfg.metric_ks))
    return cfg


def flag_text(name, value):
    """A flag as it is typed: --name value, or --name / --no-name for a boolean."""
    if isinstance(value, bool):
        return f'--{name}' if value else f'--no-{name}'
    return f'--{name} {value}'


def check_strict(cfg, given):
    """An explicit flag that --strict would override is a contradiction, not something to drop silently:
    raises ValueError naming both. A flag given with the value --strict sets is fine."""
    for name, value in STRICT.items():
        if cfg.model == 'sasrec' and name in DIFFUREC_ONLY:  # not set for SASRec (refused there by name)
            continue
        if name in given and getattr(cfg, name) != value:
            raise ValueError(f'--strict sets {flag_text(name, value)}; '
                             f'drop --strict or {flag_text(name, getattr(cfg, name))}')


# How a run samples: --recommend takes the run's values for these unless they are given.
RECOMMEND_FROM_RUN = {'sample_steps', 'precision'}
# Flags that only --recommend reads; without it they are an error, not silently ignored.
RECOMMEND_ONLY = {'topk', 'out'}
# Text flags for which "" means something: no log copy; an empty description.
EMPTY_MEANS = {'log_file', 'description'}


def given_flags(parser, argv):
    """Names of the flags given on the command line (argparse fills in only what is absent)."""
    unset = object()
    probe = argparse.Namespace(**{name: unset for name in vars(parser.parse_args([]))})
    return {name for name, value in vars(parser.parse_args(argv, namespace=probe)).items() if value is not unset}


# Flags that may change when a run is resumed: where and how it runs, not what it computes.
RESUME_MAY_CHANGE = {'resume', 'device', 'num_gpu', 'data_dir', 'log_file', 'description', 'compile', 'out_dir',
                     'time_limit', 'tensorboard'}


def resumed_config(cfg, given):
    """The config saved in cfg.resume's checkpoint; a given flag that would change it is refused by name."""
    results = os.path.join(cfg.resume, 'results.json')
    finished = ValueError(f'--resume {cfg.resume}: the run has finished, its results are in {results}; '
                          f'start a new run with another --out_dir to train again')
    if os.path.isfile(results) and not os.path.isfile(os.path.join(cfg.resume, 'checkpoint.pt')):
        raise finished  # no validation ran, so no checkpoint was written
    check_run_dir(cfg.resume, '--resume')
    state = load_checkpoint(os.path.join(cfg.resume, 'checkpoint.pt'))
    # runs from before --model: DiffuRec; from before --tensorboard: none
    saved = argparse.Namespace(**{'model': 'diffurec', 'tensorboard': None, **state['config']})
    normalise(saved)  # a config stored before normalisation compares in the same form
    differ = sorted(name for name in given - RESUME_MAY_CHANGE if getattr(cfg, name) != getattr(saved, name, None))
    if differ:
        raise ValueError(f'--resume {cfg.resume}: the run was made with ' + ', '.join(
            f'{name}={getattr(saved, name, None)!r} (given {getattr(cfg, name)!r})' for name in differ)
            + '; resume with its own flags or start a new run')
    if os.path.isfile(results):  # after the comparison: a flag given against the run is the more useful line
        raise finished
    for name in given & RESUME_MAY_CHANGE:
        setattr(saved, name, getattr(cfg, name))
    saved.time_limit = cfg.time_limit  # a budget belongs to one invocation: never inherited from the run
    saved.resume, saved.out_dir = cfg.resume, cfg.resume
    return saved


def check_out_dir(cfg):
    """A given --out_dir that holds a run already is refused, unless that run is resumed."""
    if cfg.out_dir and not cfg.resume and os.path.exists(os.path.join(cfg.out_dir, 'checkpoint.pt')):
        raise ValueError(f'--out_dir {cfg.out_dir} holds a run already; continue it with --resume {cfg.out_dir} '
                         f'or choose another --out_dir')


def make_run_dir(cfg):
    check_out_dir(cfg)
    path = cfg.out_dir
    if not path:
        stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
        path = os.path.join('runs', cfg.dataset, stamp)
        suffix = 1
        while os.path.exists(path):
            path, suffix = os.path.join('runs', cfg.dataset, f'{stamp}-{suffix}'), suffix + 1
    return utils.writable_dir(path, '--out_dir')


def check_start(cfg):
    """Everything about a config that can be checked before any work (data loading, training): check_config,
    the torchrun and device flags, the dataset's name and file, the files read (opened) and the folders written
    (proven writable, and left as they were), so that no run loses its work to a bad path at its end.
    Raises ValueError or DataError with one line naming the flag and the fix."""
    check_config(cfg)
    rank, world, _ = utils.torchrun_env()
    keep = world > 1  # the processes check the same folders at once: none may remove what another probes
    if cfg.num_gpu > 1 and world == 1:  # under torchrun --num_gpu is ignored: torchrun sets the processes
        raise ValueError(f'--num_gpu {cfg.num_gpu}: several GPUs run through torchrun, e.g. '
                         f'torchrun --nproc_per_node {cfg.num_gpu} main.py ... (see docs/long-runs.md)')
    if world > 1:
        check_world(cfg, world)
    utils.check_device(cfg.device)
    if cfg.category_file is not None:
        utils.readable_file(cfg.category_file, '--category_file')
    if cfg.tensorboard is not None:
        require_tensorboard()  # its absence is an error before any work
        utils.writable_dir(cfg.tensorboard, '--tensorboard', create=keep)
    if cfg.recommend:  # reads the run's own dataset; writes one file
        check_run_dir(cfg.recommend, '--recommend')
        utils.writable_file(cfg.out or os.path.join(cfg.recommend, 'recommendations.csv'), '--out', create=keep)
        return
    check_available(cfg.dataset, cfg.data_dir)
    if cfg.log_file:
        utils.writable_dir(cfg.log_file, '--log_file', create=keep)
    check_out_dir(cfg)
    utils.writable_dir(cfg.out_dir or os.path.join('runs', cfg.dataset), '--out_dir', create=keep)


def check_world(cfg, world):
    """Flags that must suit the `world` processes torchrun started; raises ValueError naming the fix."""
    if cfg.batch_size % world:
        raise ValueError(f'--batch_size {cfg.batch_size} is the global batch and must divide evenly among the '
                         f'{world} processes; use a multiple of {world}')
    if cfg.device.startswith('cuda:'):
        raise ValueError(f'--device {cfg.device}: under torchrun each process uses the GPU of its LOCAL_RANK; '
                         f'pass --device cuda or auto (choose GPUs with CUDA_VISIBLE_DEVICES)')


def distribute(model, device, world):
    """The model as trained by `world` processes: itself for one, wrapped in DistributedDataParallel for more."""
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)


def resume(trainer, cfg, data_checksum, rank, world):
    """Load the run's checkpoint into `trainer`, refusing one made on other data."""
    state = load_checkpoint(os.path.join(cfg.resume, 'checkpoint.pt'))
    if state['data_checksum'] != data_checksum:
        raise ValueError(f'--resume {cfg.resume}: the checkpoint was trained on other data (training samples '
                         f'{state["data_checksum"]}, now {data_checksum}); point --data_dir at the original dataset')
    trainer.load_state_dict(state)
    if world > 1:  # the checkpoint holds rank 0's generators: give each process its own stream again
        utils.set_seed(int(torch.randint(2 ** 31 - 1, (world,))[rank]))
    trainer.log(f'resumed {cfg.resume} at epoch {trainer.epoch}, batch {trainer.batch}')


def log_copy_name(dataset, run_dir):
    """Name of the run's log copy in --log_file: <dataset>_<parent folder>_<run folder>_<hash>.log. The hash (8 hex
    digits of the absolute run_dir) keeps apart run dirs whose two last names agree, e.g. the seed_<S> folders
    of two --seeds experiments, so each copy holds one run's log."""
    path = os.path.abspath(run_dir)
    digest = hashlib.sha1(path.encode()).hexdigest()[:8]
    return f'{dataset}_{os.path.basename(os.path.dirname(path))}_{os.path.basename(path)}_{digest}.log'


def run(cfg, clock=time.monotonic):
    """One experiment from a parsed config: returns the results dict (also written to results.json).
    clock: what --time_limit is counted on."""
    budget = TimeBudget(cfg.time_limit, clock) if cfg.time_limit else None  # counted from here: data loading included
    check_start(cfg)
    if cfg.loss_lambda != 0.001:
        warnings.warn('--loss_lambda has no effect: the reference objective never uses it', stacklevel=1)
    rank, world, local_rank = utils.torchrun_env()
    device = utils.choose_device(cfg.device, local_rank)
    if cfg.precision == 'bf16' and utils.bf16_is_emulated(device):
        warnings.warn('--precision bf16: this CPU has no native bf16 instructions (AVX-512 BF16 or AMX), so its '
                      'bf16 products are emulated and slower than fp32; use --precision fp32 here', stacklevel=1)
    if world > 1:
        utils.init_distributed(device, rank, world)
    utils.set_seed(cfg.random_seed)

    data = load_dataset(cfg.dataset, cfg.data_dir)
    n_items = len(data['smap'])
    if max(cfg.metric_ks) > n_items:
        raise ValueError(f'--metric_ks {max(cfg.metric_ks)} exceeds the {n_items} items of {cfg.dataset}')
    samples = build_samples(data, cfg.max_len)
    data_checksum = samples_checksum(*samples['train'])  # of the prefix samples, whatever the model
    if cfg.model == 'sasrec':  # SASRec learns from every position of a history at once: one row per user
        samples['train'] = sequence_samples(data, cfg.max_len)
    samples = {split: (x.to(device), y.to(device)) for split, (x, y) in samples.items()}  # once, not per batch
    item_categories = load_item_categories(cfg.category_file, data['smap'])[0] if cfg.category_file else None

    run_dir = utils.from_rank0(lambda: make_run_dir(cfg), rank, world)  # one directory, chosen by rank 0
    log_paths = [os.path.join(run_dir, 'log.txt')]
    if cfg.log_file:
        if rank == 0:
            utils.writable_dir(cfg.log_file, '--log_file')
        log_paths.append(os.path.join(cfg.log_file, log_copy_name(cfg.dataset, run_dir)))
    log = utils.RunLog(log_paths, enabled=rank == 0)  # only rank 0 prints and writes files
    if rank == 0:
        utils.write_json(utils.config_dict(cfg), os.path.join(run_dir, 'config.json'))

    model = build_model(cfg, n_items).to(device)
    if cfg.compile and cfg.model == 'diffurec':
        model.approximator.compile()  # in place: the state dict keeps its names
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if world > 1:
        # The model is initialised alike on every process (same seed). From here on each process draws its
        # own timesteps, noise and dropout: its seed is drawn alike everywhere and picked by rank.
        utils.set_seed(int(torch.randint(2 ** 31 - 1, (world,))[rank]))
    smoke = bool(cfg.limit_train_batches or cfg.limit_eval_batches)
    log(f'{"SASRec" if cfg.model == "sasrec" else "DiffuRec"} on {cfg.dataset}: {len(data["train"])} users, '
        f'{n_items} items, {len(samples["train"][1])} training samples; {n_params:,} parameters; device {device}; run dir {run_dir}'
        + (f'; {world} processes, {cfg.batch_size // world} rows each per batch' if world > 1 else ''))
    if smoke:
        log('smoke run: --limit_train_batches/--limit_eval_batches set, results are marked smoke')

    excluded = {split: histories(data, split) for split in ('val', 'test')} if cfg.exclude_history else None
    trainer = Trainer(distribute(model, device, world), cfg, samples, run_dir, device, log, rank=rank, world=world,
                      data_checksum=data_checksum, histories=excluded, budget=budget)
    if cfg.resume:
        resume(trainer, cfg, data_checksum, rank, world)
    trainer.fit()

    if trainer.kept_state is None:
        log('no validation ran (epochs <= eval_interval): testing the final model')
    final = trainer.final_model()
    topk_items = []
    test = trainer.evaluate_split('test', model=final, topk_items=topk_items)
    summary = trainer.summary()
    rows = {'test': test}
    if trainer.best:
        selection = summary['selection']
        rows = {'best valid': trainer.best, f'kept valid (epoch {selection["epoch"]})': selection['valid'], **rows}
    log('\n' + metrics_table(rows))
    diversity = diversity_metrics(torch.cat(topk_items), final.item_table.weight, n_items, item_categories)
    log('diversity of the test top-K: ' + '  '.join(f'{k} {v}' for k, v in diversity.items()))

    results = {
        'model': cfg.model, 'dataset': cfg.dataset, 'config': utils.config_dict(cfg), 'test': test,
        **summary, 'diversity': diversity, 'n_params': n_params, 'device': str(device),
        'torch_version': torch.__version__, 'smoke': smoke, 'data_checksum': data_checksum,
        'host': platform.node(), 'threads': torch.get_num_threads(), 'world_size': world,
    }
    if cfg.epoch_time_avg:
        results['epoch_time_avg'] = round(sum(trainer.epoch_seconds) / max(len(trainer.epoch_seconds), 1), 3)
        log(f'mean epoch time: {results["epoch_time_avg"]:.2f}s over {len(trainer.epoch_seconds)} epochs')
    if cfg.long_head:
        groups = {}
        test_histories = histories(data, 'test')  # a group predicts the test item from train + val
        for name, (inputs, labels, users) in group_users(data, cfg.max_len).items():
            if len(labels):
                group_histories = [test_histories[u] for u in users.tolist()]
                groups[name] = trainer.evaluate_split(name, model=final, data=(inputs, labels, group_histories))
                groups[name]['users'] = len(labels)
        results['long_head'] = groups
        log('group analysis\n' + metrics_table({k: {m: v[m] for m in metric_names(cfg.metric_ks)}
                                                for k, v in groups.items()}))
    if rank == 0:
        utils.write_json(results, os.path.join(run_dir, 'results.json'))
        write_curves(run_dir, trainer, cfg.metric_ks, log)
    log(f'results written to {os.path.join(run_dir, "results.json")}')
    return results


def write_curves(run_dir, trainer, ks, log):
    """curves.png in the run directory when matplotlib is installed, else a one-line notice."""
    path = os.path.join(run_dir, 'curves.png')
    if plot_curves(path, trainer.epoch_losses, trainer.history, metric_names(ks), trainer.kept_epoch):
        log(f'training curves written to {path}')
    else:
        log('matplotlib is not installed: no curves.png (pip install matplotlib to get the training curves)')


def aggregate_results(per_seed):
    """{seed: results of run()} -> aggregate.json: every test metric and diversity value over the seeds.

    Per metric: mean, std (sample standard deviation, n - 1; None for one seed), values (in seed order).
    """
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    names = list(first['test']) + [k for k, v in first['diversity'].items() if v is not None]
    metrics = {}
    for name in names:
        values = [r['test'][name] if name in r['test'] else r['diversity'][name] for r in per_seed.values()]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        metrics[name] = {'mean': round(mean, 4), 'std': None if std is None else round(std, 4), 'values': values}
    return {'dataset': first['dataset'], 'seeds': seeds, 'std': 'sample standard deviation (n - 1)',
            'metrics': metrics}


def aggregate_table(aggregate):
    """The aggregate as text: one line per metric, mean +- std over the seeds."""
    n = len(aggregate['seeds'])
    lines = [f'{aggregate["dataset"]}, {n} seed(s) {" ".join(map(str, aggregate["seeds"]))}: mean +- std (n - 1)']
    for name, m in aggregate['metrics'].items():
        std = 'n/a' if m['std'] is None else f'{m["std"]:.4f}'
        lines.append(f'{name:>22}  {m["mean"]:10.4f} +- {std}')
    return '\n'.join(lines)


def run_seeds(cfg):
    """--seeds S1 S2 ...: run() once per seed, in <out_dir>/seed_<S>/, then aggregate_results over the
    seeds, printed and written to <out_dir>/aggregate.json (returned).

    Under torchrun every process takes part in every run; rank 0 alone makes <out_dir> (its name is sent to
    the others) and prints and writes the aggregate."""
    duplicate = next((s for s in cfg.seeds if cfg.seeds.count(s) > 1), None)
    if duplicate is not None:
        raise ValueError(f'--seeds lists {duplicate} twice; give each seed once')
    if cfg.resume:
        raise ValueError('--seeds cannot be combined with --resume; resume each <out_dir>/seed_<S> run on its own')
    if cfg.time_limit:
        raise ValueError('--seeds cannot be combined with --time_limit; run each seed on its own with --random_seed')
    check_config(cfg)
    rank, world, local_rank = utils.torchrun_env()
    if world > 1:  # joined here already, for the broadcast of the base folder; run() finds it joined
        check_world(cfg, world)
        utils.init_distributed(utils.choose_device(cfg.device, local_rank), rank, world)
    base = utils.from_rank0(lambda: make_run_dir(cfg), rank, world)
    per_seed = {}
    for seed in cfg.seeds:
        one = argparse.Namespace(**{**vars(cfg), 'random_seed': seed, 'seeds': None,
                                    'out_dir': os.path.join(base, f'seed_{seed}'),
                                    'tensorboard': cfg.tensorboard and os.path.join(cfg.tensorboard, f'seed_{seed}')})
        per_seed[seed] = run(one)
    aggregate = aggregate_results(per_seed)
    aggregate['runs'] = {str(seed): os.path.join(base, f'seed_{seed}') for seed in cfg.seeds}
    if rank == 0:
        utils.write_json(aggregate, os.path.join(base, 'aggregate.json'))
        print(aggregate_table(aggregate))
        print(f'aggregate written to {os.path.join(base, "aggregate.json")}')
    return aggregate


def run_command(cfg, clock=time.monotonic):
    """What main() runs: --recommend, --seeds, or one run (its --time_limit counted on `clock`)."""
    if cfg.recommend:
        if cfg.seeds:
            raise ValueError('--recommend reads a trained run; it cannot be combined with --seeds')
        path = recommend(cfg, default_data_dir=build_parser().get_default('data_dir'))
        print(f'recommendations written to {path}')
    elif cfg.seeds:
        run_seeds(cfg)
    else:
        run(cfg, clock)


def main(argv=None, clock=time.monotonic):
    """Exit status: 0 done; 1 interrupted or a non-finite loss; 2 bad input; 3 stopped by --time_limit
    (resumable, not finished). clock: what --time_limit is counted on (the tests' runs pass a fake one)."""
    utils.keep_freed_memory()
    together = False  # whether every process ends at the same point (not after an error of one of them)
    try:
        cfg = parse_config(argv)
        check_start(cfg)  # before any work: each run of --seeds checks its own folders again
        run_command(cfg, clock)
        together = True
    except (ValueError, DataError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except TimeUp as e:  # resumable, not finished
        together = True
        print(str(e), file=sys.stderr)
        return 3
    except RunStopped as e:  # an interrupt or a non-finite loss, agreed by every process
        together = True
        print(str(e), file=sys.stderr)
        return 1
    finally:
        utils.end_distributed(together)
    return 0


if __name__ == '__main__':
    sys.exit(main())
