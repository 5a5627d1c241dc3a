"""Reproduce the paper's Table 2: one main.py run per (dataset, seed), then the measured table beside the paper's.

    python reproduce.py                                    # amazon_beauty toys ml-1m, seeds 1997 1 2
    python reproduce.py --time_limit 9m --device cuda      # a 9-minute slice; the same command continues
    python reproduce.py --out runs/reproduce --report      # table.md, table.json, curves.png of what finished
    python reproduce.py --out runs/reproduce --export results/diffurec   # the report and the evidence to commit
    python reproduce.py --out runs/sasrec --model sasrec --preset published --test_both_protocols
                                                           # SASRec beside the strongest published SASRec

Each run lives in <out>/<dataset>/seed_<S>/ and is a `python main.py` subprocess with the reference's defaults
(the authors' script takes only --dataset) plus every flag this script does not know, which is passed through.
<out>/reproduce.json records the plan: every (dataset, seed) run asked for, and the first call's main.py flags.
A later call runs its own --datasets x --seeds (the whole plan when it gives neither), adds those new to the
plan, skips the finished runs, resumes the interrupted ones, and refuses other main.py flags.

Exit status: 0 every run finished (report written); 3 the time budget is spent (run the same command again);
a failed run's own status (its last error lines are shown); 2 bad flags; 128 + the signal number after
Ctrl-C or SIGTERM (the running pieces write their checkpoints first).
"""
import collections
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import cli
import config
import utils
from aggregate import PROTOCOLS, aggregate_results
from plots import plot_reproduction
from data import DataError, check_available, check_name
from model import model_class
from stopping import PAUSED
from rundir import CHECKPOINT, CONFIG, LOG, METRICS, RESULTS, progress, read_json

REPO = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATASETS = ['amazon_beauty', 'toys', 'ml-1m']
DEFAULT_SEEDS = [1997, 1, 2]
STATE_FILE = 'reproduce.json'
REPORT_FILES = ('table.md', 'table.json', 'curves.png')
# What --export copies of a finished run: everything but its checkpoint.
EVIDENCE = (RESULTS, METRICS, CONFIG, LOG, 'curves.png')

PAPER_METRICS = ['HR@5', 'HR@10', 'HR@20', 'NDCG@5', 'NDCG@10', 'NDCG@20']
# Table 2 of the paper, DiffuRec's row, in percent.
PAPER_TABLE2 = {
    'amazon_beauty': [5.5758, 7.9068, 11.1098, 4.0047, 4.7494, 5.5566],
    'toys': [5.5650, 7.4587, 9.8417, 4.1667, 4.7724, 5.3684],
    'ml-1m': [17.9659, 26.2647, 36.7870, 12.1150, 14.7909, 17.4386],
}
PAPER = {name: dict(zip(PAPER_METRICS, row)) for name, row in PAPER_TABLE2.items()}
# What each --model's measured rows stand beside, in percent: the paper's DiffuRec row; for SASRec the strongest
# published rows on the same preprocessed data, whose configurations --preset published sets (docs/sasrec.md):
# the eSASRec benchmark's SASRec with sampled softmax (amazon_beauty, toys), Klenitskiy & Vasilev (ml-1m).
REFERENCES = {
    'diffurec': ("the paper's Table 2", PAPER),
    'sasrec': ('published SASRec', {'amazon_beauty': {'HR@10': 9.21, 'NDCG@10': 5.31},
                                    'toys': {'HR@10': 9.70, 'NDCG@10': 5.80},
                                    'ml-1m': {'HR@10': 31.52}}),
}

# main.py flags this script sets for each run itself.
OWN_MAIN_FLAGS = ('dataset', 'random_seed', 'out_dir', 'log_file', 'resume', 'seeds', 'recommend', 'time_limit')
# A piece needs seconds to load the data and the model; with less time left it would only rewrite its checkpoint.
MIN_PIECE_SECONDS = 10
STDERR_TAIL = 8
PROGRESS_BAR = re.compile(r'\d+%\|')  # tqdm's lines on stderr, left out of the lines shown on failure


def build_parser():
    p = cli.ArgumentParser(prog='reproduce.py',
                           description='Run DiffuRec on the paper\'s datasets and seeds and compare with the '
                                       'paper\'s Table 2 (with --model sasrec: with the published SASRec rows). '
                                       'Every flag not listed here is passed to main.py (python main.py --help).')
    p.add_argument('--datasets', nargs='+', default=None, metavar='D',
                   help=f'datasets of this call (default {" ".join(DEFAULT_DATASETS)}, or all the plan\'s); '
                        'runs new to --out join its plan')
    p.add_argument('--seeds', type=cli.seed, nargs='+', default=None, metavar='S',
                   help=f'seeds of this call (default {" ".join(map(str, DEFAULT_SEEDS))}, or all the plan\'s)')
    p.add_argument('--out', default='runs/reproduce', help='folder of the runs and the report')
    p.add_argument('--time_limit', type=cli.duration, default=None, metavar='T',
                   help='budget of this call (seconds, or a number with s/m/h); when spent: checkpoints, exit 3')
    p.add_argument('--parallel', type=cli.positive_int, default=1, metavar='N', help='runs side by side')
    p.add_argument('--report', action='store_true', help='only write the report of the finished runs in --out')
    p.add_argument('--export', default=None, metavar='DIR',
                   help='write the report, then copy it and each finished run\'s evidence (no checkpoints) to DIR, '
                        'naming paths inside the repository relative to it (e.g. results/diffurec)')
    return p


# ----------------------------------------------------------------------------------------------------------
# main.py flags and the state of --out
# ----------------------------------------------------------------------------------------------------------

def main_parser():
    parser = config.build_parser()

    def error(message):
        raise ValueError(f'{message} (a flag passed to main.py; python main.py --help lists them)')
    parser.error = error
    return parser


def check_main_flags(flags):
    """Reject pass-through flags main.py does not know, or that this script sets itself (ValueError, one line)."""
    parser = main_parser()
    own = [name for name in OWN_MAIN_FLAGS if name in config.given_flags(parser, flags)]
    if own:
        raise ValueError(f'--{own[0]} is set by reproduce.py for each run; drop it '
                         f'(use --datasets, --seeds, --out, --time_limit)')


def check_configs(flags, datasets):
    """main.py's own checks of the flags, for each dataset (its presets differ), and that the dataset is there
    (or downloadable), before any run starts."""
    for dataset in datasets:
        cfg = config.resolve(['--dataset', dataset] + flags)
        config.check_config(cfg)
        try:
            check_available(dataset, cfg.data_dir)
        except DataError as e:
            raise ValueError(f'--datasets {dataset}: {e}') from None


def differing_flags(first, now):
    """Names of the main.py settings on which two flag lists differ, compared after parsing; those given in
    `now` first."""
    parser = main_parser()
    a, b = vars(parser.parse_args(first)), vars(parser.parse_args(now))
    given = config.given_flags(parser, now)
    return sorted((name for name in a if a[name] != b[name]), key=lambda name: name not in given)


def check_plan(datasets, seeds):
    """Each dataset a plain folder name, each dataset and seed once (two runs must not share a folder)."""
    for name, values in (('datasets', datasets), ('seeds', seeds)):
        twice = next((v for v in values or [] if values.count(v) > 1), None)
        if twice is not None:
            raise ValueError(f'--{name} lists {twice} twice; give each once')
    for name in datasets or []:
        try:
            check_name(name, '--datasets')
        except DataError as e:
            raise ValueError(str(e)) from None


def planned_runs(state):
    """The plan's runs [(dataset, seed)] in order. A reproduce.json written before the plan could grow holds
    datasets and seeds instead: their product."""
    if 'runs' in state:
        return [(dataset, seed) for dataset, seed in state['runs']]
    return [(dataset, seed) for dataset in state['datasets'] for seed in state['seeds']]


def load_plan(out, args, flags):
    """(the plan of `out` with this call's new runs added, this call's runs, the runs added).

    The call's runs are --datasets x --seeds, in the plan's order (runs asked for earlier start first); a flag
    left out stands for all the plan's values (on a new `out` the defaults), so a call with neither runs the
    whole plan. The main.py flags must be the first call's."""
    check_plan(args.datasets, args.seeds)
    path = os.path.join(out, STATE_FILE)
    if os.path.exists(path):
        state = read_json(path)
        differ = differing_flags(state['main_flags'], flags)
        if differ:
            a, b = vars(main_parser().parse_args(state['main_flags'])), vars(main_parser().parse_args(flags))
            raise ValueError(f'--{differ[0]} differs from the first call on {out} ({a[differ[0]]!r} then, '
                             f'{b[differ[0]]!r} now'
                             + (f'; also {", ".join("--" + n for n in differ[1:])}' if differ[1:] else '')
                             + f'); repeat its flags ({shlex.join(state["main_flags"]) or "none"}) '
                             f'or choose another --out')
        plan, first_flags = planned_runs(state), state['main_flags']
    else:
        plan, first_flags = [], flags
    if plan and args.datasets is None and args.seeds is None:
        return {'runs': plan, 'main_flags': first_flags}, plan, []
    datasets = args.datasets or list(dict.fromkeys(d for d, _ in plan)) or DEFAULT_DATASETS
    seeds = args.seeds or list(dict.fromkeys(s for _, s in plan)) or DEFAULT_SEEDS
    asked = [(dataset, seed) for dataset in datasets for seed in seeds]
    added = [run for run in asked if run not in plan]
    plan += added
    runs = [run for run in plan if run in asked]  # in the plan's order
    return {'runs': plan, 'main_flags': first_flags}, runs, added


# ----------------------------------------------------------------------------------------------------------
# One run's progress
# ----------------------------------------------------------------------------------------------------------

def run_dir(out, dataset, seed):
    return os.path.join(out, dataset, f'seed_{seed}')


def is_smoke(flags):
    """Whether main.py flags make smoke runs (results.json marks them 'smoke')."""
    return config.is_smoke(main_parser().parse_args(flags))


def wall_seconds(summary):
    """Training plus validation seconds of a run (the test evaluation is not timed)."""
    return sum(summary['epoch_seconds']) + sum(v.get('seconds') or 0 for v in summary['validations'])


def clock(seconds):
    seconds = int(round(seconds))
    return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def best_ndcg10(validations):
    rows = [v for v in validations if v.get('NDCG@10') is not None]
    return max(rows, key=lambda v: v['NDCG@10']) if rows else None


def progress_line(dataset, seed, summary):
    """dataset, seed, epoch reached, best validation NDCG@10, elapsed time, and an upper bound on the time left:
    the remaining epochs (and validations) up to max_epochs at the run's mean epoch (validation) seconds."""
    head = f'{dataset} seed {seed}:'
    if summary['status'] == 'new':
        return f'{head} starting'
    epoch, total = summary['epoch'], summary['max_epochs']
    parts = [f'epoch {epoch}' + (f'/{total}' if total else '')]
    best = best_ndcg10(summary['validations'])
    parts.append(f'best valid NDCG@10 {best["NDCG@10"]:.4f} (epoch {int(best["epoch"])})' if best
                 else 'no validation yet')
    parts.append(f'{clock(wall_seconds(summary))} elapsed')
    seconds = summary['epoch_seconds']
    if total and seconds:
        interval = summary['eval_interval']
        due = sum(1 for e in range(epoch, total) if e and e % interval == 0) if interval else 0
        val_seconds = [v['seconds'] for v in summary['validations'] if v.get('seconds') is not None]
        left = (total - epoch) * sum(seconds) / len(seconds)
        if val_seconds:
            left += due * sum(val_seconds) / len(val_seconds)
        parts.append(f'at most {clock(left)} left (all {total} epochs; early stopping ends sooner)')
    return f'{head} resuming at ' + ', '.join(parts)


# ----------------------------------------------------------------------------------------------------------
# Running the pieces
# ----------------------------------------------------------------------------------------------------------

class SubprocessRunner:
    """Runs one main.py piece: runner(cmd, cwd, path) -> (exit status, last stderr lines).

    The piece's stdout (its log: epochs, validations, test) is appended to <path>/stdout.txt (main.py also
    writes its log.txt there) and shown on this process's stdout, each line after "<dataset> seed <S>: ",
    so that a run of hours shows its epochs as they end; its stderr is read as it comes (progress bars
    included) and only the last lines are kept.
    stop() asks every running piece to write its checkpoint and exit (SIGTERM, which main.py handles).
    """

    def __init__(self):
        self.procs = set()
        self.lock = threading.RLock()  # stop() may run in a signal handler while the main thread holds it

    def __call__(self, cmd, cwd, path):
        tail = collections.deque(maxlen=STDERR_TAIL)
        label = f'{os.path.basename(os.path.dirname(path))} {os.path.basename(path).replace("_", " ")}'
        with open(os.path.join(path, 'stdout.txt'), 'a') as out:
            proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    errors='replace')
            echo = threading.Thread(target=show_lines, args=(proc.stdout, out, label), daemon=True)
            echo.start()
            with self.lock:
                self.procs.add(proc)
            try:
                for line in proc.stderr:
                    tail.extend(part for part in line.replace('\r', '\n').split('\n')
                                if part.strip() and not PROGRESS_BAR.search(part))
                code = proc.wait()
                echo.join()
                return code, list(tail)
            finally:
                with self.lock:
                    self.procs.discard(proc)

    def stop(self):
        with self.lock:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)


def piece_command(path, dataset, seed, flags, seconds):
    """main.py's command line for the next piece of a run: a fresh start, or --resume when a checkpoint exists
    (the checkpoint holds the run's whole config, and reproduce.json has kept the flags unchanged)."""
    if os.path.exists(os.path.join(path, CHECKPOINT)):
        args = ['--resume', path, '--log_file', '']
    else:
        args = ['--dataset', dataset, '--random_seed', str(seed), '--out_dir', path, '--log_file', ''] + flags
    if seconds is not None:
        args += ['--time_limit', f'{int(seconds)}s']
    return [sys.executable, 'main.py'] + args


def show_lines(stream, log, label):
    """Each line of `stream`: appended to the file `log` as it is, and printed after "label: ". The stream is
    read to its end whatever fails (a full disk, a closed console): a piece whose pipe is not drained blocks."""
    targets = {'log': lambda line: (log.write(line), log.flush()),
               'console': lambda line: print(f'{label}: {line.rstrip()}', flush=True)}
    for line in stream:
        for name, write in list(targets.items()):
            try:
                write(line)
            except (OSError, ValueError):  # ValueError: the file was closed
                del targets[name]


def run_all(todo, out, flags, parallel, budget, runner):
    """Run the pieces of the unfinished runs `todo` [(dataset, seed)], up to `parallel` at a time, each given
    what is left of `budget` seconds (None: no limit). Returns 0 (all finished), PAUSED (budget spent or a
    piece paused), the status of a failed piece (the other pieces are then stopped at a checkpoint), or
    128 + the signal number after Ctrl-C or SIGTERM (the pieces write their checkpoints first)."""
    start = time.monotonic()
    pending, running, status, stopping, signals = list(todo), {}, 0, False, []

    def on_signal(signum, frame):
        if not signals:
            print(f'{signal.Signals(signum).name} received: the running pieces write their checkpoints and stop',
                  file=sys.stderr, flush=True)
        signals.append(signum)
        if hasattr(runner, 'stop'):  # Ctrl-C reaches the pieces by itself, a SIGTERM to this process does not
            runner.stop()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            while pending or running:
                while pending and len(running) < parallel and status == 0 and not signals:
                    left = None if budget is None else budget - (time.monotonic() - start)
                    if left is not None and left < MIN_PIECE_SECONDS:
                        status = PAUSED
                        break
                    dataset, seed = pending.pop(0)
                    path = run_dir(out, dataset, seed)
                    os.makedirs(path, exist_ok=True)
                    print(progress_line(dataset, seed, progress(path, smoke_ok=is_smoke(flags))), flush=True)
                    running[pool.submit(runner, piece_command(path, dataset, seed, flags, left), REPO, path)] = \
                        (dataset, seed)
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    dataset, seed = running.pop(future)
                    code, tail = future.result()
                    if code == 0:
                        print(f'{dataset} seed {seed}: finished', flush=True)
                    elif code == PAUSED or stopping or signals:
                        saved = os.path.exists(os.path.join(run_dir(out, dataset, seed), CHECKPOINT))
                        print(f'{dataset} seed {seed}: paused, ' + ('checkpoint written' if saved else
                                                                    'before its first checkpoint'), flush=True)
                        status = status or PAUSED
                    else:
                        print(f'{dataset} seed {seed}: main.py exited with status {code}; its last lines:\n  '
                              + '\n  '.join(tail), file=sys.stderr, flush=True)
                        if status in (0, PAUSED):
                            status, stopping = (code if code > 0 else 1), True
                            if hasattr(runner, 'stop'):
                                runner.stop()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if signals and status in (0, PAUSED):
        return 128 + signals[0]
    return status


# ----------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------

def seed_of(name):
    match = re.fullmatch(r'seed_(-?\d+)', name)
    return int(match[1]) if match else None


def collect_runs(out, state):
    """{dataset: {seed: run_summary}} for the planned runs (state) and any other <dataset>/seed_<S> folder."""
    planned = {}
    for dataset, seed in planned_runs(state) if state else []:
        planned.setdefault(dataset, []).append(seed)
    found = {}
    if os.path.isdir(out):
        for dataset in sorted(os.listdir(out)):
            folder = os.path.join(out, dataset)
            seeds = sorted(s for s in map(seed_of, os.listdir(folder)) if s is not None) \
                if os.path.isdir(folder) else []
            if seeds:
                found[dataset] = seeds
    runs = {}
    for dataset in list(planned) + [d for d in found if d not in planned]:
        seeds = planned.get(dataset, []) + [s for s in found.get(dataset, []) if s not in planned.get(dataset, [])]
        smoke_ok = bool(state) and is_smoke(state['main_flags'])
        runs[dataset] = {s: progress(run_dir(out, dataset, s), smoke_ok) for s in seeds}
    return runs


def dataset_report(dataset, runs, reference=None):
    """table.json's entry of one dataset: the reference row (`reference`: {metric: value}, or None), the
    measured mean +- std over the finished seeds and its relative difference, the same under each history
    protocol when the runs tested both (--test_both_protocols), and each finished run's epochs, time, device."""
    finished = {s: r['results'] for s, r in runs.items() if r['status'] == 'finished'}
    entry = {'reference': reference, 'seeds': list(finished), 'measured': None, 'relative_difference': None,
             'runs': []}

    def against_reference(measured):
        return {m: round((measured[m]['mean'] - reference[m]) / reference[m] * 100, 2)
                for m in measured if m in reference} if reference else None
    if finished:
        aggregate = aggregate_results(finished)
        names = [m for m in PAPER_METRICS if m in aggregate['metrics']] or list(next(iter(finished.values()))['test'])
        entry['measured'] = {m: aggregate['metrics'][m] for m in names}
        entry['relative_difference'] = against_reference(entry['measured'])
        for protocol in PROTOCOLS.values():
            if all(f'{protocol} {m}' in aggregate['metrics'] for m in names):
                measured = {m: aggregate['metrics'][f'{protocol} {m}'] for m in names}
                entry.setdefault('by_history', {})[protocol] = {
                    'measured': measured, 'relative_difference': against_reference(measured)}
    for seed, results in finished.items():
        entry['runs'].append({
            'seed': seed, 'epochs_run': results['epochs_run'], 'kept_epoch': results['kept_epoch'],
            'wall_seconds': round(wall_seconds(runs[seed]), 1), 'device': results['device'],
            'hardware': results.get('hardware'), 'torch_version': results['torch_version'],
            'smoke': results.get('smoke', False), 'test': results['test']})
    return entry


def markdown(report):
    flags = report['main_flags']
    flags = ('unknown (no reproduce.json)' if flags is None else f'`{shlex.join(flags)}`' if flags
             else 'none (the reference)')
    reference = report['reference']
    lines = [f'# {model_class(report["model"]).title}: measured test metrics beside {reference}', '',
             f'Runs in `{report["out"]}`; main.py flags: {flags}.',
             'Percent. Measured: mean +- sample standard deviation (n - 1) over the finished seeds. '
             'Difference: (measured - reference) / reference.', '']
    for dataset, entry in report['datasets'].items():
        lines += [f'## {dataset}', '']
        names = list(entry['measured'] or PAPER_METRICS)
        lines += ['| | ' + ' | '.join(names) + ' |', '|---|' + '---:|' * len(names)]
        if entry['reference']:
            lines.append(f'| {reference} | ' + ' | '.join(
                f'{entry["reference"][m]:.4f}' if m in entry['reference'] else '' for m in names) + ' |')
        if entry['measured']:
            n = len(entry['seeds'])
            rows = [('', entry['measured'], entry['relative_difference'])] + [
                (f', {protocol}', row['measured'], row['relative_difference'])
                for protocol, row in entry.get('by_history', {}).items()]
            for label, measured, difference in rows:
                lines.append(f'| measured{label}, {n} seed{"s" if n > 1 else ""} | ' + ' | '.join(
                    f'{v["mean"]:.4f} +- ' + ('n/a' if v['std'] is None else f'{v["std"]:.4f}')
                    for v in measured.values()) + ' |')
                if difference:
                    lines.append('| difference | ' + ' | '.join(
                        f'{difference[m]:+.2f}%' if m in difference else '' for m in names) + ' |')
            lines += ['', '| seed | epochs run | kept epoch | train + valid time | device | torch |',
                      '|---:|---:|---:|---:|---|---|']
            for run in entry['runs']:
                device = run['device'] + (f' ({run["hardware"]})' if run['hardware'] else '')
                lines.append(f'| {run["seed"]} | {run["epochs_run"]} | {run["kept_epoch"]} | '
                             f'{clock(run["wall_seconds"])} | {device}{" (smoke)" if run["smoke"] else ""} | '
                             f'{run["torch_version"]} |')
        else:
            lines += ['', 'no finished run yet']
        lines.append('')
    if report['unfinished']:
        lines += ['## Unfinished (not averaged)', '']
        lines += [f'- unfinished: {u["dataset"]} {u["seed"]} '
                  + (f'(epoch {u["epoch"]})' if u['epoch'] is not None
                     else '(no checkpoint yet)' if u['started'] else '(not started)')
                  for u in report['unfinished']]
        lines.append('')
    return '\n'.join(lines)


def report_model(state, runs):
    """The --model of the runs: from reproduce.json's main.py flags, else from a finished run, else DiffuRec."""
    if state:
        return main_parser().parse_args(state['main_flags']).model
    finished = [r['results'] for seeds in runs.values() for r in seeds.values() if r['status'] == 'finished']
    return finished[0].get('model', 'diffurec') if finished else 'diffurec'


def is_inside(path, folder):
    return os.path.commonpath([os.path.abspath(path), folder]) == folder


def write_report(out):
    """table.md, table.json and curves.png in `out` from the runs there; returns the report dict."""
    state_path = os.path.join(out, STATE_FILE)
    state = read_json(state_path) if os.path.exists(state_path) else None
    runs = collect_runs(out, state)
    if not runs:
        raise ValueError(f'nothing to report in {out}: no {STATE_FILE} and no <dataset>/seed_<S> run folders; '
                         f'start the runs with python reproduce.py --out {out}')
    model = report_model(state, runs)
    reference, table = REFERENCES[model]
    report = {'out': os.path.relpath(out, REPO) if is_inside(out, REPO) else out, 'model': model,
              'main_flags': state['main_flags'] if state else None, 'reference': reference,
              'std': 'sample standard deviation (n - 1)',
              'relative_difference': '(measured - reference) / reference, percent',
              'datasets': {d: dataset_report(d, seeds, table.get(d)) for d, seeds in runs.items()},
              'unfinished': [{'dataset': d, 'seed': s, 'epoch': r['epoch'] if r['status'] != 'new' else None,
                              'started': os.path.isdir(run_dir(out, d, s))}
                             for d, seeds in runs.items() for s, r in seeds.items() if r['status'] != 'finished']}
    utils.write_json(report, os.path.join(out, 'table.json'))
    utils.write_atomic(os.path.join(out, 'table.md'), lambda f: f.write(markdown(report)))
    print(f'report written to {os.path.join(out, "table.md")} and table.json')
    reference_ndcg10 = {d: table[d]['NDCG@10'] for d in runs if 'NDCG@10' in table.get(d, {})}
    if plot_reproduction(os.path.join(out, 'curves.png'), runs, reference_ndcg10, reference):
        print(f'validation curves written to {os.path.join(out, "curves.png")}')
    else:
        print('matplotlib is not installed: no curves.png (pip install matplotlib to get the curves)')
    return report


def relative_to_repo(text):
    """`text` with this repository's absolute path written relative to its root."""
    return text.replace(REPO + os.sep, '')


def export_evidence(out, dest):
    """Copy the report of `out` and each finished run's EVIDENCE files to `dest` (same layout), the text files
    with relative_to_repo, so that what is committed names no machine. Unfinished runs are left out."""
    out, dest = os.path.abspath(out), os.path.abspath(dest)
    if is_inside(dest, out):
        raise ValueError(f'--export {dest}: a folder inside --out; choose another one, e.g. results/diffurec')
    report = write_report(out)  # first: with nothing to report, nothing is made at dest
    cli.writable_dir(dest, '--export')
    runs = [run_dir('', d, s) for d, entry in report['datasets'].items() for s in entry['seeds']]
    written = 0
    for name in list(REPORT_FILES) + [os.path.join(run, e) for run in runs for e in EVIDENCE]:
        source, target = os.path.join(out, name), os.path.join(dest, name)
        if not os.path.isfile(source):
            continue  # curves.png without matplotlib
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if source.endswith('.png'):
            shutil.copyfile(source, target)
        else:
            with open(source, encoding='utf-8') as f:
                text = relative_to_repo(f.read())
            utils.write_atomic(target, lambda f: f.write(text))
        written += 1
    print(f'{written} files of the report and {len(runs)} finished run(s) copied to {dest}')
    return report


# ----------------------------------------------------------------------------------------------------------

def reproduce(argv, runner):
    parser = build_parser()
    args, flags = parser.parse_known_args(argv)
    cli.check_not_empty(parser, args)
    out = os.path.abspath(args.out)
    if args.report or args.export:
        extra = flags + [f'--{n}' for n in ('datasets', 'seeds', 'time_limit') if getattr(args, n) is not None]
        if extra:
            raise ValueError(f'--{"report" if args.report else "export"} reads what is in --out; drop {extra[0]}')
        if args.export:
            export_evidence(out, args.export)
        else:
            write_report(out)
        return 0
    check_main_flags(flags)
    state, runs, added = load_plan(out, args, flags)
    check_configs(flags, list(dict.fromkeys(d for d, _ in runs)))
    cli.writable_dir(out, '--out')  # before any run: a bad --out must not surface at the report
    if added:
        if len(added) < len(state['runs']):
            print(f'added to the plan of {out}: ' + ', '.join(f'{d} seed {s}' for d, s in added))
        utils.write_json(state, os.path.join(out, STATE_FILE))
    smoke = is_smoke(flags)
    todo = [(d, s) for d, s in runs if progress(run_dir(out, d, s), smoke)['status'] != 'finished']
    if len(todo) < len(runs):
        print(f'{len(runs) - len(todo)} run(s) finished already, skipped')
    status = run_all(todo, out, flags, args.parallel, args.time_limit, runner)
    if status == PAUSED:
        left = sum(progress(run_dir(out, d, s), smoke)['status'] != 'finished' for d, s in todo)
        print(f'time budget spent: {left} run(s) unfinished; continue with the same command: '
              f'python reproduce.py {shlex.join(argv)}')
    elif status == 0:
        write_report(out)
    elif status > 128:
        print(f'stopped by {signal.Signals(status - 128).name}; continue with the same command: '
              f'python reproduce.py {shlex.join(argv)}')
    return status


def main(argv=None, runner=None):
    """Command line -> exit status. runner: how a piece runs (default: a main.py subprocess), see SubprocessRunner."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return reproduce(argv, runner or SubprocessRunner())
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except OSError as e:  # e.g. --out not writable
        print(f'error: {e.filename}: {e.strerror}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
