"""Every flag of every entry point, fuzzed from its parser: each hostile value that fits the flag's kind ends in
exit status 2, one `error:` line naming the flag, no traceback and nothing written, before any work starts;
the values that are legal are listed by name in ALLOWED, each with its reason. A flag added to a parser later is
fuzzed as well, and fails here until it refuses its hostile values or they are allowed.

The entry points run in-process up to their start-up checks: the work they would then do (main.py's runs and
recommendations, bench.py's timing, reproduce.py's pieces) is replaced by a recorder, so a legal value shows as
a start. datasets/prepare.py runs whole, on a log of a few lines.
"""
import contextlib
import io
import os
import pickle
import shutil
import time

import pytest

import bench
import config
import main
import reproduce
from data import make_synthetic
from test_prepare import prep

# Paths that fail for root too (the suite runs as root, where permissions do not stop reads or writes):
# /proc takes no new files or folders, and the kernel refuses root a read of this write-only sysctl.
READ_ONLY_DIR = '/proc'
UNREADABLE_FILE = '/proc/sys/vm/drop_caches'

NUMBER_VALUES = {'empty': '', 'negative': '-1', 'zero': '0', 'nan': 'nan', 'inf': 'inf', 'huge': '9' * 40,
                 'non-number': 'abc'}
CHOICE_VALUES = {'empty': '', 'not a choice': 'nope'}
# Text and path values; a path is relative to the working folder, a folder inside the sandbox.
TEXT_VALUES = {'empty': '', 'dots': os.path.join('..', 'dots'), 'odd char': 'odd ü*?$;\'" name',
               'file for folder': os.path.join('..', 'file.txt'), 'folder for file': os.path.join('..', 'folder'),
               'missing parent': os.path.join('..', 'missing', 'deeper', 'name'),
               'under a file': os.path.join('..', 'file.txt', 'name'), 'read-only folder': READ_ONLY_DIR,
               'unreadable file': UNREADABLE_FILE}

FOLDER_WRITTEN = 'a folder to write: made when missing, and any writable one, whatever its name, will do'
FILE_WRITTEN = 'a file to write: its folder is made when missing, an existing file is replaced'
# (entry point, flag, value kind) -> why the value is legal. The legal values must start the work.
ALLOWED = {
    **{(entry, flag, 'zero'): 'dropout in [0, 1): 0 is no dropout'
       for entry in ('main.py', 'bench.py') for flag in ('--dropout', '--emb_dropout')},
    **{(entry, flag, kind): reason for entry in ('main.py', 'bench.py') for flag, kind, reason in (
        ('--lambda_uncertainty', 'zero', 'no uncertainty weight noise (docs/extensions.md)'),
        ('--lambda_uncertainty', 'huge', 'any weight >= 0; a diverging run stops at the non-finite loss guard'),
        ('--lr', 'huge', 'any positive rate; a diverging run stops at the non-finite loss guard'),
        ('--weight_decay', 'zero', 'no weight decay, the default'),
        ('--weight_decay', 'huge', 'any decay >= 0'),
        ('--momentum', 'zero', 'momentum in [0, 1)'),
        ('--gamma', 'huge', 'any positive StepLR factor'),
        ('--loss_lambda', 'negative', 'unused by the objective (a warning says so): any finite number'),
        ('--loss_lambda', 'zero', 'unused by the objective (a warning says so): any finite number'),
        ('--loss_lambda', 'huge', 'unused by the objective (a warning says so): any finite number'),
        ('--random_seed', 'zero', 'a seed in [0, 2**32 - 1]'))},
    ('main.py', '--seeds', 'zero'): 'a seed in [0, 2**32 - 1]',
    ('reproduce.py', '--seeds', 'zero'): 'a seed in [0, 2**32 - 1]',
    ('main.py', '--time_limit', 'huge'): 'any positive budget; one longer than the run never stops it',
    ('reproduce.py', '--time_limit', 'huge'): 'any positive budget; one longer than the runs never stops them',
    **{('main.py', '--description', kind): 'free text stored with the run' for kind in TEXT_VALUES},
    ('main.py', '--log_file', 'empty'): '"" means no log copy (docs/flags.md)',
    ('main.py', '--category_file', 'file for folder'): 'a readable file; its content is read with the dataset, '
                                                      'whose item ids it needs (test_extras.py checks bad ones)',
    ('main.py', '--out', 'file for folder'): FILE_WRITTEN,
    ('bench.py', '--json', 'file for folder'): FILE_WRITTEN,
    ('bench.py', '--warmup', 'zero'): 'no untimed steps',
    ('bench.py', '--profile', 'zero'): 'no profile, the default',
    ('prepare.py', '--min_count', 'zero'): '0 turns the k-core filter off',
    ('prepare.py', '--min_rating', 'zero'): 'keeps the rows rated >= 0: all of them',
    ('prepare.py', '--min_rating', 'negative'): 'keeps the rows rated >= -1: all of them',
    ('prepare.py', '--name', 'odd char'): 'any plain folder name (no /, no leading dot), as main.py --dataset takes',
    **{(entry, flag, kind): FOLDER_WRITTEN
       for entry, flag in (('main.py', '--out_dir'), ('main.py', '--log_file'), ('main.py', '--tensorboard'),
                           ('reproduce.py', '--out'), ('prepare.py', '--data_dir'), ('prepare.py', '--out_dir'))
       for kind in ('dots', 'odd char', 'folder for file', 'missing parent')},
    **{(entry, flag, kind): FILE_WRITTEN
       for entry, flag in (('main.py', '--out'), ('bench.py', '--json'))
       for kind in ('dots', 'odd char', 'missing parent')},
}


class Started(Exception):
    """Raised by reproduce.py's runner in place of the first piece: the checks let the work start."""


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A folder with the inputs the base command lines need; the working folder is sandbox/work."""
    (tmp_path / 'work').mkdir()
    (tmp_path / 'folder').mkdir()
    (tmp_path / 'file.txt').write_text('a regular file\n')
    (tmp_path / 'data' / 'mine').mkdir(parents=True)
    with open(tmp_path / 'data' / 'mine' / 'dataset.pkl', 'wb') as f:
        pickle.dump(make_synthetic(n_users=30, n_items=40, seed=1), f)
    (tmp_path / 'run').mkdir()  # a trained run as --recommend's start-up check sees it: a checkpoint is there
    (tmp_path / 'run' / 'checkpoint.pt').write_bytes(b'')
    rows = [f'u{u},i{i},{1 + (u + i) % 5},{100 * u + i}' for u in range(8) for i in range(7)]
    (tmp_path / 'log.csv').write_text('user,item,rating,timestamp\n' + '\n'.join(rows) + '\n')
    monkeypatch.chdir(tmp_path / 'work')
    started = []
    monkeypatch.setattr(main, 'run_command', lambda cfg, clock=None: started.append(cfg))
    monkeypatch.setattr(bench, 'bench', lambda cfg, device, data: started.append(cfg) or 0)
    return tmp_path


def run_reproduce(argv):
    def runner(cmd, cwd, path):
        raise Started()
    try:
        return reproduce.main(argv, runner=runner)
    except Started:
        return 0


DATA = os.path.join('..', 'data')
# entry point -> (parser, run(argv) -> exit status, base command line; {n} is a fresh number per call)
ENTRY_POINTS = {
    'main.py': (config.build_parser, main.main, ['--dataset', 'mine', '--data_dir', DATA]),
    'bench.py': (bench.bench_parser, bench.main, ['--dataset', 'mine', '--data_dir', DATA]),
    'reproduce.py': (reproduce.build_parser, run_reproduce,
                     ['--out', 'reproduce_{n}', '--datasets', 'mine', '--seeds', '1', '--data_dir', DATA]),
    'prepare.py': (prep.build_parser, prep.main, [os.path.join('..', 'log.csv'), '--name', 'mine',
                                                   '--data_dir', 'prepared_{n}', '--quiet']),
}


def value_kinds(action):
    """The hostile values fitting a flag: by its argparse action, not by a list of names."""
    if action.nargs == 0:  # a switch: it takes no value
        return {'explicit value': '=yes'}
    kinds = {'missing value': None}
    kinds.update(CHOICE_VALUES if action.choices else NUMBER_VALUES if action.type is not None else TEXT_VALUES)
    return kinds


def command(entry, action, option, kind, value, n):
    """The entry point's base command line with the flag under test given the value (last, so that it wins)."""
    base = [arg.format(n=n) for arg in ENTRY_POINTS[entry][2]]
    if not action.option_strings:  # the positional input of prepare.py comes first
        return base[1:] if value is None else [value] + base[1:]
    if entry == 'main.py' and action.dest in config.RECOMMEND_ONLY:  # --recommend's companions
        base += ['--recommend', os.path.join('..', 'run')]
    if kind == 'explicit value':
        return base + [option + value]
    return base + [option] + ([] if value is None else [value])


def tree(root):
    return {os.path.join(folder, name) for folder, dirs, files in os.walk(root) for name in dirs + files}


def call(run, argv):
    """(exit status, stderr) of one in-process call; argparse's own exits count as an exit status too."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = run(argv)
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


def all_pairs():
    for entry, (parser, _, _) in ENTRY_POINTS.items():
        for action in parser()._actions:
            for option in action.option_strings or [action.dest]:
                for kind, value in value_kinds(action).items():
                    yield entry, action, option, kind, value


def test_the_premises_of_the_hostile_paths_hold_for_this_user(tmp_path):
    with pytest.raises(OSError):
        open(UNREADABLE_FILE, 'rb').read(1)
    with pytest.raises(OSError):
        os.mkdir(os.path.join(READ_ONLY_DIR, 'diffurec_probe'))
    assert os.path.isdir(READ_ONLY_DIR)


def fuzz(sandbox, pairs):
    """Each pair's call checked: (failures, one line each; refused pairs; legal pairs, all in ALLOWED)."""
    failures, refused, legal = [], [], []
    for n, (entry, action, option, kind, value) in enumerate(pairs):
        argv = command(entry, action, option, kind, value, n)
        before = tree(sandbox)
        rc, err = call(ENTRY_POINTS[entry][1], argv)
        key = (entry, option, kind)
        lines = err.strip().splitlines()
        if key in ALLOWED:
            legal.append(key)
            if rc != 0:
                failures.append(f'{key} is allowed but was refused: {err.strip()[-300:]}')
            made = tree(sandbox) - before  # what the started work wrote: removed, each call starts alike
            for path in sorted(made):
                if os.path.dirname(path) not in made:
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            continue
        names = action.option_strings or [action.dest]
        if rc != 2 or len(lines) != 1 or not lines[0].startswith('error: ') or 'Traceback' in err \
                or not any(name in lines[0] for name in names):
            failures.append(f'{key} {argv}: exit {rc}, stderr {err.strip()[-400:]!r}')
        elif tree(sandbox) != before:
            failures.append(f'{key}: refused, but wrote {sorted(tree(sandbox) - before)[:3]}')
        else:
            refused.append(key)
    return failures, refused, legal


def test_every_flag_refuses_its_hostile_values_in_one_line_or_is_allowed(sandbox):
    started = time.monotonic()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    repo_before = set(os.listdir(repo))
    pairs = list(all_pairs())
    failures, refused, legal = fuzz(sandbox, pairs)
    assert not failures, f'{len(failures)} of {len(pairs)} pairs:\n' + '\n'.join(failures)
    tried = {(entry, option, kind) for entry, _, option, kind, _ in pairs}
    assert not set(ALLOWED) - tried, f'allowed pairs no parser has any more: {sorted(set(ALLOWED) - tried)}'
    assert set(os.listdir(repo)) == repo_before  # nothing written in the repository
    assert len(refused) + len(legal) == len(pairs) > 900, (len(refused), len(legal), len(pairs))
    print(f'{len(pairs)} (flag, value) pairs: {len(refused)} refused, {len(legal)} legal, '
          f'{time.monotonic() - started:.1f} s')
    assert time.monotonic() - started < 30


def test_a_flag_added_to_a_parser_is_fuzzed_and_fails_until_it_is_checked(sandbox, monkeypatch):
    build = config.build_parser

    def with_new_flag():
        parser = build()
        parser.add_argument('--new_folder', default=None, help='a new flag nobody checks')
        return parser
    monkeypatch.setattr(config, 'build_parser', with_new_flag)
    monkeypatch.setitem(ENTRY_POINTS, 'main.py', (with_new_flag,) + ENTRY_POINTS['main.py'][1:])
    pairs = [pair for pair in all_pairs() if pair[2] == '--new_folder']
    assert {kind for _, _, _, kind, _ in pairs} == {'missing value', *TEXT_VALUES}
    failures, refused, legal = fuzz(sandbox, pairs)
    # argparse refuses a missing value by itself; "" is refused by the check of empty text flags; every other
    # value is taken unchecked, and reported
    assert [key[2] for key in refused] == ['missing value', 'empty'] and legal == []
    assert len(failures) == len(TEXT_VALUES) - 1 and all("'--new_folder'" in line for line in failures)


@pytest.mark.parametrize('epochs', [1, 2])  # 1: no validation ran, so no checkpoint; 2: a checkpoint as well
def test_resume_of_a_finished_run_says_where_its_results_are(tmp_path, capsys, epochs):
    run_dir = str(tmp_path / 'run')
    assert main.main(['--dataset', 'synthetic', '--hidden_size', '8', '--num_blocks', '1', '--epochs', str(epochs),
                      '--eval_interval', '1', '--limit_train_batches', '1', '--limit_eval_batches', '1',
                      '--log_file', '', '--out_dir', run_dir]) == 0
    assert os.path.isfile(os.path.join(run_dir, 'checkpoint.pt')) == (epochs == 2)
    capsys.readouterr()
    assert main.main(['--resume', run_dir]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f'error: --resume {run_dir}: the run has finished, its results are in '
                   f'{os.path.join(run_dir, "results.json")}; start a new run with another --out_dir to train again')


@pytest.mark.parametrize('flag', ['--log_file', '--tensorboard'])
def test_a_regular_file_as_an_output_folder_is_one_line_before_any_work(tmp_path, capsys, flag):
    path = tmp_path / 'taken'
    path.write_text('')
    assert main.main(['--dataset', 'synthetic', flag, str(path), '--out_dir', str(tmp_path / 'run')]) == 2
    assert capsys.readouterr().err == (f'error: {flag} {path}: cannot write a folder there (a file is in the way); '
                                       f'choose another {flag}\n')
    assert os.listdir(tmp_path) == ['taken']  # no run folder: refused before any work
