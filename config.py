"""The run's configuration: main.py's flags, the presets, the rules between flags, and one resolve(argv).

Every entry point takes its config from here (main.py, and bench.py, reproduce.py and recommend's flags
through main.py's parser), so a flag's default, preset and checks are written once:

    cfg = config.resolve(argv)     # flags -> namespace; presets, --strict and --resume applied, values checked
"""
import argparse
import math
import os

import cli
from data import DEFAULT_DATA_DIR
from metrics import metric_names
from model import MODELS, foreign_flags
import rundir
from cli import duration, finite_float, positive_int

METRIC_CHOICES = ('batch', 'user')

# `--dataset synthetic` is for trying the pipeline in minutes on a CPU: a smaller model and a shorter
# schedule, used for every flag not given on the command line (after the model's own preset).
SYNTHETIC_PRESET = dict(hidden_size=64, num_blocks=2, batch_size=256, epochs=20, eval_interval=5, patience=2)

STRICT = dict(attention_mask='key', rank_padding=False, exclude_history=True, metric_average='user',
              select_metric='NDCG@10', update_lossaware=True)


# How a run samples: --recommend takes the run's values for these unless they are given.
RECOMMEND_FROM_RUN = {'sample_steps', 'precision'}
# Flags that only --recommend reads; without it they are an error, not silently ignored.
RECOMMEND_ONLY = {'topk', 'out'}
# Text flags for which "" means something: no log copy; an empty description.
EMPTY_MEANS = {'log_file', 'description'}


# Flags that may change when a run is resumed: where and how it runs, not what it computes.
RESUME_MAY_CHANGE = {'resume', 'device', 'num_gpu', 'data_dir', 'log_file', 'description', 'compile', 'out_dir',
                     'time_limit', 'tensorboard', 'test_both_protocols'}


def build_parser():
    """main.py's parser: every flag, grouped as `python main.py --help` lists them."""
    parser = cli.ArgumentParser(prog='main.py',
                                description='DiffuRec (Li, Sun, Li, TOIS 2024): a diffusion model for sequential '
                                            'recommendation. Defaults reproduce the authors\' code.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for add in (data_flags, model_flags, training_flags, evaluation_flags, run_flags, recommend_flags):
        add(parser)
    return parser


def data_flags(parser):
    """Which dataset, where, and how much of each history."""
    data = parser.add_argument_group('data')
    data.add_argument('--dataset', default='amazon_beauty',
                      help='amazon_beauty, toys, ml-1m, steam, synthetic, or a folder name under --data_dir')
    data.add_argument('--data_dir', default=DEFAULT_DATA_DIR, help='folder holding <dataset>/dataset.pkl')
    data.add_argument('--max_len', type=positive_int, default=50, help='history length L (older items are cut)')


def model_flags(parser):
    """The model: DiffuRec's Approximator and diffusion, or SASRec."""
    B = argparse.BooleanOptionalAction
    model = parser.add_argument_group('model')
    model.add_argument('--model', default='diffurec', choices=list(MODELS),
                       help='diffurec, or sasrec: the SASRec baseline trained with full cross-entropy, whose '
                            'defaults for flags not given are ' + ', '.join(f'{k} {v}' for k, v in MODELS['sasrec'].preset.items()))
    model.add_argument('--preset', default='default', choices=['default', 'published'],
                       help='sasrec: published takes, for the flags not given, the configuration published for '
                            '--dataset (' + ', '.join(MODELS['sasrec'].published_presets) + '; docs/sasrec.md)')
    model.add_argument('--loss', default='full', choices=list(MODELS['sasrec'].losses),
                       help='sasrec: full = softmax cross-entropy over every item; sampled = over the target and '
                            '--negatives items drawn uniformly (the eSASRec benchmark\'s sampled softmax)')
    model.add_argument('--negatives', type=positive_int, default=256,
                       help='sasrec with --loss sampled: negatives drawn per target position')
    model.add_argument('--block', default='preln', choices=list(MODELS['sasrec'].block_kinds),
                       help='sasrec: preln = pre-LayerNorm blocks with the causal and key mask; original = the block '
                            'of SASRec\'s original code (normalised queries as residuals, causal mask only)')
    model.add_argument('--padding', default='left', choices=list(MODELS['sasrec'].paddings),
                       help='sasrec: left = the last item takes the last position and the original block sees '
                            'padding keys; right = as right-padded sequences (positions from the first item, '
                            'padding never a key), the layout of Klenitskiy & Vasilev\'s code')
    model.add_argument('--init', default='xavier', choices=list(MODELS['sasrec'].inits),
                       help='sasrec: xavier = Xavier-normal tables, feed-forward and attention output; '
                            'normal = N(0, 0.02^2) for every linear layer and embedding (Klenitskiy & Vasilev\'s, '
                            'RecBole\'s)')
    model.add_argument('--inner_size', type=positive_int, default=None,
                       help='sasrec: width of the blocks\' feed-forward layer (default 4 x --hidden_size)')
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


def training_flags(parser):
    """The optimisation, the seed and the precision."""
    train = parser.add_argument_group('training')
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
    train.add_argument('--random_seed', type=cli.seed, default=1997, help='seed of every generator')
    train.add_argument('--precision', default='fp32', choices=['fp32', 'bf16'],
                       help='bf16: training under autocast, evaluation with a bf16 copy of the approximator')
    train.add_argument('--compile', action='store_true', help='torch.compile the model (CUDA)')


def evaluation_flags(parser):
    """Validation, testing and the rule that keeps a model."""
    ev = parser.add_argument_group('evaluation and model selection')
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
    ev.add_argument('--exclude_history', action=argparse.BooleanOptionalAction, default=False,
                    help="do not rank the items of the user's history (default: rank them, as the reference does)")
    ev.add_argument('--select_metric', default=None,
                    help='keep the model that is best on this one metric (e.g. NDCG@10) instead of any metric')
    ev.add_argument('--strict', action='store_true',
                    help='all corrections at once: --attention_mask key --no-rank_padding --exclude_history '
                         '--metric_average user --select_metric NDCG@10 --update_lossaware (one of these given '
                         'with another value is an error)')
    ev.add_argument('--test_both_protocols', action='store_true',
                    help='also test the kept model under the other --exclude_history setting: results.json gets '
                         'test_history_ranked and test_history_excluded (model selection is unchanged)')
    ev.add_argument('--long_head', action='store_true', help='also test hot/cold and length groups of users')
    ev.add_argument('--diversity_measure', action='store_true',
                    help='category diversity of the test top-K (needs --category_file)')
    ev.add_argument('--category_file', default=None, metavar='PATH',
                    help='JSON or CSV mapping original item id -> category: adds category diversity to results.json')
    ev.add_argument('--epoch_time_avg', action='store_true', help='report the mean epoch time')


def run_flags(parser):
    """Where and how a run executes: device, folders, pieces, seeds."""
    run = parser.add_argument_group('run')
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
    run.add_argument('--seeds', type=cli.seed, nargs='+', default=None, metavar='S',
                     help='one run per seed in <out_dir>/seed_<S>/, then mean +- std in <out_dir>/aggregate.json')


def recommend_flags(parser):
    """--recommend: top-K lists from a trained run, no training."""
    rec = parser.add_argument_group('recommendations from a trained run')
    rec.add_argument('--recommend', default=None, metavar='RUN_DIR',
                     help='write every user\'s top --topk items (original ids) from the run in RUN_DIR; no training. '
                          'It samples with the run\'s --sample_steps and --precision unless they are given')
    rec.add_argument('--topk', type=positive_int, default=20, help='items per user for --recommend')
    rec.add_argument('--out', default=None, metavar='PATH',
                     help='CSV for --recommend (default RUN_DIR/recommendations.csv)')


def resolve(argv=None):
    """Flags -> the run's config namespace: the presets for the flags not given, --strict, the checks of one
    value against another; with --resume, the run's saved config, after checking the flags given against it.
    Raises ValueError (one line naming the flag and the fix)."""
    parser = set_presets(build_parser(), argv)
    cfg = normalise(parser.parse_args(argv))
    given = given_flags(parser, argv)
    cli.check_not_empty(parser, cfg, EMPTY_MEANS)
    misplaced = sorted(RECOMMEND_ONLY & given) if not cfg.recommend else []
    if misplaced:
        raise ValueError(f'--{misplaced[0]} is for --recommend RUN_DIR; add --recommend or drop --{misplaced[0]}')
    if cfg.strict:
        apply_strict(cfg, given)
    if cfg.resume:
        return resumed_config(cfg, given)
    if cfg.recommend:  # None: the trained run's own value (recommend.py), unless given
        for name in RECOMMEND_FROM_RUN - given:
            setattr(cfg, name, None)
    foreign = foreign_flags(cfg.model)
    misplaced = sorted(name for name in given if name in foreign)
    if misplaced:
        raise ValueError(f'--{misplaced[0]} configures {foreign[misplaced[0]].title} and does not apply to '
                         f'--model {cfg.model}; drop it')
    if 'negatives' in given and cfg.loss != 'sampled':
        raise ValueError(f'--negatives applies to --loss sampled only (the loss is {cfg.loss}); add --loss sampled '
                         f'or drop --negatives')
    return cfg


def set_presets(parser, argv):
    """The defaults of the model's preset, of its published configuration for --dataset under --preset published,
    and of --dataset synthetic on `parser`, for the flags argv does not give. ValueError when --preset published
    names a dataset the model has no published configuration for."""
    known, _ = parser.parse_known_args(argv)
    cls = MODELS[known.model]
    parser.set_defaults(**cls.preset)
    published = getattr(cls, 'published_presets', None)
    if known.preset == 'published' and published is not None:  # with another model --preset is refused later
        if known.dataset not in published:
            raise ValueError(f'--preset published: no published {cls.title} configuration for --dataset '
                             f'{known.dataset} (there are for {", ".join(published)}); drop --preset')
        parser.set_defaults(**published[known.dataset])
    if known.dataset == 'synthetic':  # after SASRec's: the short schedule wins
        parser.set_defaults(**SYNTHETIC_PRESET)
    return parser


def is_smoke(cfg):
    """Whether a config makes a smoke run (--limit_train_batches or --limit_eval_batches): results.json marks it."""
    return bool(cfg.limit_train_batches or cfg.limit_eval_batches)


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
        check_sample_steps(getattr(cfg, name), cfg.diffusion_steps, f'--{name}')
    if cfg.select_metric and cfg.select_metric not in metric_names(cfg.metric_ks):
        raise ValueError(f'--select_metric {cfg.select_metric} is not one of {", ".join(metric_names(cfg.metric_ks))}')
    if cfg.diversity_measure and not cfg.category_file:
        raise ValueError('--diversity_measure needs --category_file PATH (JSON or CSV: original item id -> category)')


def check_sample_steps(steps, diffusion_steps, flag='--sample_steps', source='--diffusion_steps'):
    """A number of reverse steps K must lie in [1, T]; raises ValueError naming `flag` and where T comes from."""
    if steps is not None and not 1 <= steps <= diffusion_steps:
        raise ValueError(f'{flag} must lie in [1, {diffusion_steps}] ({source}), got {steps}')


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


def apply_strict(cfg, given):
    """--strict: set every correction of STRICT that the model reads (SASRec's attention is causal already, so
    the diffusion's are left out). A flag given with another value is a contradiction, not something to drop
    silently: raises ValueError naming both. A flag given with the value --strict sets is fine."""
    foreign = foreign_flags(cfg.model)
    for name, value in STRICT.items():
        if name in foreign:
            continue
        if name in given and getattr(cfg, name) != value:
            raise ValueError(f'--strict sets {flag_text(name, value)}; '
                             f'drop --strict or {flag_text(name, getattr(cfg, name))}')
        setattr(cfg, name, value)


def given_flags(parser, argv):
    """Names of the flags given on the command line (argparse fills in only what is absent)."""
    unset = object()
    probe = argparse.Namespace(**{name: unset for name in vars(parser.parse_args([]))})
    return {name for name, value in vars(parser.parse_args(argv, namespace=probe)).items() if value is not unset}


def resumed_config(cfg, given):
    """The config saved in cfg.resume's checkpoint; a given flag that would change it is refused by name."""
    finished = ValueError(f'--resume {cfg.resume}: the run has finished, its results are in '
                          f'{os.path.join(cfg.resume, rundir.RESULTS)}; start a new run with another --out_dir to '
                          f'train again')
    if rundir.finished(cfg.resume) and not os.path.isfile(os.path.join(cfg.resume, rundir.CHECKPOINT)):
        raise finished  # no validation ran, so no checkpoint was written
    rundir.check_run_dir(cfg.resume, '--resume')
    state = rundir.load_checkpoint(os.path.join(cfg.resume, rundir.CHECKPOINT))
    saved = argparse.Namespace(**rundir.saved_config(cfg.resume, state))
    normalise(saved)  # a config stored before normalisation compares in the same form
    differ = sorted(name for name in given - RESUME_MAY_CHANGE if getattr(cfg, name) != getattr(saved, name, None))
    if differ:
        raise ValueError(f'--resume {cfg.resume}: the run was made with ' + ', '.join(
            f'{name}={getattr(saved, name, None)!r} (given {getattr(cfg, name)!r})' for name in differ)
            + '; resume with its own flags or start a new run')
    if rundir.finished(cfg.resume):  # after the comparison: a flag given against the run is the more useful line
        raise finished
    for name in given & RESUME_MAY_CHANGE:
        setattr(saved, name, getattr(cfg, name))
    saved.time_limit = cfg.time_limit  # a budget belongs to one invocation: never inherited from the run
    saved.resume, saved.out_dir = cfg.resume, cfg.resume
    return saved
