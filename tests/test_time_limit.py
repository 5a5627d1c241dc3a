"""--time_limit: a run cut into pieces by its time budget ends exactly as an uninterrupted run does."""
import argparse
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

import config
import main
import cli
from metrics import metric_names
import stopping

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 epochs of 4 training batches, a validation (2 batches) after epochs 1, 2 and 3, a test of 2 batches.
SMALL = ['--dataset', 'synthetic', '--hidden_size', '16', '--num_blocks', '1', '--diffusion_steps', '4',
         '--log_file', '', '--epochs', '4', '--eval_interval', '1', '--limit_train_batches', '4',
         '--limit_eval_batches', '2']


def stop_lines(err):
    """The lines of stderr that report a time-limit stop (progress bars end their lines with \\r)."""
    return [line for line in re.split(r'[\r\n]', err) if line.startswith('time limit')]


def results(run_dir):
    with open(os.path.join(run_dir, 'results.json')) as f:
        return json.load(f)


def test_a_run_cut_by_its_time_limit_ends_as_the_whole_run(tmp_path, clock, capsys):
    whole, cut = str(tmp_path / 'whole'), str(tmp_path / 'cut')
    assert main.main(SMALL + ['--out_dir', whole]) == 0
    capsys.readouterr()
    # (time limit, where the piece stops). The budget is in clock units: 10 per batch.
    pieces = [
        ('75', 'at epoch 1 batch 3'),                          # a cut inside an epoch
        ('30', 'during the validation of epoch 1'),            # no validation timed yet: started, then cut
        ('2m', 'before the validation of epoch 3 (about 20s)'),  # 0 left; a validation takes 20
        ('35', 'before the test (about 20s)'),                 # the validation fits, the test does not
    ]
    for i, (limit, where) in enumerate(pieces):
        argv = ['--resume', cut] if i else SMALL + ['--out_dir', cut]
        assert main.main(argv + ['--time_limit', limit], clock=clock) == 3
        err = capsys.readouterr().err
        [line] = stop_lines(err)
        shown = stopping.format_duration(cli.duration(limit))
        assert line.startswith(f'time limit {shown}: stopped {where} with '), line
        assert line.endswith(f'checkpoint written. Resume with: python main.py --resume {cut} --time_limit {shown}')
        assert 'Traceback' not in err and not os.path.exists(os.path.join(cut, 'results.json'))
    state = torch.load(os.path.join(cut, 'checkpoint.pt'), weights_only=True)
    assert (state['epoch'], state['batch'], len(state['history'])) == (4, 0, 3)  # trained, validated, untested
    assert main.main(['--resume', cut, '--time_limit', '100'], clock=clock) == 0  # the test only: 20 units
    a, b = results(whole), results(cut)
    assert a['epoch_losses'] == b['epoch_losses'] and len(b['epoch_losses']) == 4
    assert a['test'] == b['test'] and a['best_valid'] == b['best_valid'] and a['kept_epoch'] == b['kept_epoch']
    names = metric_names(a['config']['metric_ks'])
    assert [[v[m] for m in names] for v in a['validations']] == [[v[m] for m in names] for v in b['validations']]


def test_a_budget_too_small_for_anything_stops_cleanly_with_status_3(tmp_path):
    run_dir = str(tmp_path / 'run')
    proc = subprocess.run([sys.executable, 'main.py'] + SMALL + ['--out_dir', run_dir, '--time_limit', '1s'],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 3 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    assert stop_lines(proc.stderr) == [f'time limit 1s: stopped at epoch 0 batch 0 with 0s left; checkpoint written. '
                     f'Resume with: python main.py --resume {run_dir} --time_limit 1s']
    state = torch.load(os.path.join(run_dir, 'checkpoint.pt'), weights_only=True)
    assert (state['epoch'], state['batch'], state['epoch_losses']) == (0, 0, [])


def test_the_limit_is_per_invocation_and_may_be_given_with_resume(tmp_path, clock, capsys):
    run_dir = str(tmp_path / 'run')
    assert main.main(SMALL + ['--out_dir', run_dir, '--time_limit', '40'], clock=clock) == 3
    assert config.resolve(['--resume', run_dir]).time_limit is None  # not inherited
    assert config.resolve(['--resume', run_dir, '--time_limit', '9m']).time_limit == 540
    capsys.readouterr()
    assert main.main(['--resume', run_dir], clock=clock) == 0  # no limit: to the end
    assert results(run_dir)['epochs_run'] == 4


@pytest.mark.parametrize('text, seconds', [('90', 90), ('90s', 90), ('9m', 540), ('1.5h', 5400), ('.5', 0.5),
                                           ('2.m', 120)])
def test_duration_parses_seconds_and_suffixes(text, seconds):
    assert cli.duration(text) == seconds


@pytest.mark.parametrize('text', ['', 'm', 'abc', '0', '0s', '-5', '5d', '9M', 'inf', 'nan', '1e3', '1h30m'])
def test_a_bad_time_limit_is_one_argparse_error(text, capsys):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.duration(text)
    assert main.main(['--time_limit', text]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: argument --time_limit: expected'), err


def test_format_duration_gives_a_time_limit_value():
    assert [stopping.format_duration(s) for s in (5400, 3600, 540, 90, 0.5)] == ['90m', '1h', '9m', '90s', '0.5s']
    for s in (5400, 3600, 540, 90, 0.5):
        assert cli.duration(stopping.format_duration(s)) == s


def test_time_limit_with_seeds_is_refused(tmp_path, capsys):
    rc = main.main(SMALL + ['--seeds', '1', '2', '--time_limit', '1h', '--out_dir', str(tmp_path / 'run')])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith('error: --seeds cannot be combined with --time_limit') and '\n' not in err


def test_processes_under_torchrun_stop_together(tmp_path):
    """Two CPU processes: the time-out of either stops both at the same batch, with the same checkpoint.
    The run is long enough (no early stop) that even a fast machine reaches the limit first."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    run_dir = str(tmp_path / 'run')
    env = {k: v for k, v in os.environ.items() if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK')}
    env.update(MASTER_ADDR='127.0.0.1', OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
           '--master_port', str(port), 'main.py'] + SMALL + ['--epochs', '100000', '--patience', '100000',
                                                                    '--out_dir', run_dir, '--time_limit', '10']
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    # torchrun stops the other process as soon as one exits non-zero, so it may report one exit status 3 or two
    assert 1 <= proc.stderr.count('exitcode  : 3') <= 2 and 'exitcode  : 1' not in proc.stderr, proc.stderr[-3000:]
    lines = stop_lines(proc.stderr)  # each process that got to print names the same point: its checkpoint's
    assert 1 <= len(lines) <= 2 and len({line.split(' with ')[0] for line in lines}) == 1, lines
    first = lines[0]
    state = torch.load(os.path.join(run_dir, 'checkpoint.pt'), weights_only=True)
    assert first.startswith('time limit 10s: stopped ') and re.search(rf'epoch {state["epoch"]}\b', first), first
    if ' at epoch ' in first:
        assert f'at epoch {state["epoch"]} batch {state["batch"]} with' in first
