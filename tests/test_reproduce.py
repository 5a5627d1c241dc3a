"""reproduce.py: the plan of runs, skipping and resuming, the refused flags, the time budget, the report."""
import json
import os
import re
import shutil
import signal
import statistics
import sys
import threading
import time

import pytest

import reproduce

# Tiny DiffuRec on the synthetic data: a run takes a few seconds, mostly start-up.
FLAGS = ['--epochs', '2', '--eval_interval', '1', '--hidden_size', '8', '--heads', '2', '--num_blocks', '1',
         '--diffusion_steps', '4']


def call(out, *extra, runner=None):
    return reproduce.main(['--datasets', 'synthetic', '--seeds', '1', '2', '--out', str(out), *FLAGS, *extra],
                          runner=runner)


def results(out, seed):
    with open(os.path.join(out, 'synthetic', f'seed_{seed}', 'results.json')) as f:
        return json.load(f)


def never_runs(cmd, cwd, path):
    pytest.fail(f'no piece should run, got {cmd}')


class Recorder:
    """A fake piece runner: records each command and returns the next of `codes`."""

    def __init__(self, *codes, tail=()):
        self.codes, self.tail, self.commands = list(codes), list(tail), []

    def __call__(self, cmd, cwd, path):
        self.commands.append(cmd)
        return self.codes.pop(0), self.tail


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    """Two finished synthetic runs (seeds 1 and 2) made by one call, sequentially, with real main.py subprocesses."""
    out = tmp_path_factory.mktemp('reproduce') / 'out'
    assert call(out) == 0
    return out


def test_full_call_writes_the_table_with_mean_and_sample_std(finished):
    with open(finished / 'table.json') as f:
        table = json.load(f)
    entry = table['datasets']['synthetic']
    assert entry['reference'] is None and entry['relative_difference'] is None  # synthetic is not in Table 2
    assert entry['seeds'] == [1, 2] and table['unfinished'] == []
    runs = [results(finished, 1), results(finished, 2)]
    for name in reproduce.PAPER_METRICS:
        values = [r['test'][name] for r in runs]
        assert entry['measured'][name]['mean'] == pytest.approx(statistics.mean(values), abs=1e-4)
        assert entry['measured'][name]['std'] == pytest.approx(statistics.stdev(values), abs=1e-4)
    assert [r['epochs_run'] for r in entry['runs']] == [2, 2]
    assert entry['runs'][0]['kept_epoch'] == runs[0]['kept_epoch']
    assert entry['runs'][0]['device'] == 'cpu' and entry['runs'][0]['torch_version'] == runs[0]['torch_version']
    assert entry['runs'][0]['hardware'] == runs[0]['hardware'] and runs[0]['hardware']
    assert entry['runs'][0]['wall_seconds'] == pytest.approx(
        sum(runs[0]['epoch_seconds']) + sum(v['seconds'] for v in runs[0]['validations']), abs=0.1)
    md = (finished / 'table.md').read_text()
    mean, std = entry['measured']['NDCG@10']['mean'], entry['measured']['NDCG@10']['std']
    assert f'{mean:.4f} +- {std:.4f}' in md and '| measured, 2 seeds |' in md and '| paper |' not in md
    assert f'| cpu ({runs[0]["hardware"]}) |' in md
    assert (finished / 'curves.png').stat().st_size > 0
    assert json.loads((finished / 'reproduce.json').read_text()) == {
        'runs': [['synthetic', 1], ['synthetic', 2]], 'main_flags': FLAGS}


def test_second_call_skips_finished_runs(finished, capsys):
    paths = [finished / 'synthetic' / f'seed_{s}' / 'results.json' for s in (1, 2)]
    before = [p.stat().st_mtime_ns for p in paths]
    # Without --datasets/--seeds the first call's plan is used; the flags are the same.
    assert reproduce.main(['--out', str(finished), *FLAGS], runner=never_runs) == 0
    assert [p.stat().st_mtime_ns for p in paths] == before
    assert '2 run(s) finished already, skipped' in capsys.readouterr().out


def test_differing_flags_are_refused_by_name(finished, capsys):
    assert reproduce.main(['--out', str(finished), *FLAGS[:-2], '--diffusion_steps', '8'], runner=never_runs) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: --diffusion_steps differs from the first call')
    # normalised: the same values spelled otherwise are the same flags
    spelled = ['--epochs=2', '--eval_interval', '1', '--hidden_size', '8', '--heads=2', '--num_blocks', '1',
               '--diffusion_steps', '4', '--optimizer', 'Adam']
    assert reproduce.main(['--out', str(finished), *spelled], runner=never_runs) == 0
    # a call that would add runs with other flags is refused before the plan grows
    before = (finished / 'reproduce.json').read_text()
    assert reproduce.main(['--out', str(finished), '--seeds', '3', *FLAGS[:-1], '8'], runner=never_runs) == 2
    assert (finished / 'reproduce.json').read_text() == before


def test_a_later_call_adds_seeds_runs_only_its_own_and_a_plain_call_runs_the_whole_plan(finished, tmp_path, capsys):
    out = tmp_path / 'out'
    shutil.copytree(finished, out)
    recorder = Recorder(3)
    assert reproduce.main(['--datasets', 'synthetic', '--seeds', '2', '3', '--out', str(out), *FLAGS],
                          runner=recorder) == 3
    [cmd] = recorder.commands  # seed 2 finished already; seed 1 is not this call's
    assert cmd[2:6] == ['--dataset', 'synthetic', '--random_seed', '3']
    printed = capsys.readouterr().out
    assert f'added to the plan of {out}: synthetic seed 3' in printed and '1 run(s) finished already' in printed
    assert json.loads((out / 'reproduce.json').read_text())['runs'] == [
        ['synthetic', 1], ['synthetic', 2], ['synthetic', 3]]
    recorder = Recorder(3)
    assert reproduce.main(['--out', str(out), *FLAGS], runner=recorder) == 3
    assert [c[2:6] for c in recorder.commands] == [['--dataset', 'synthetic', '--random_seed', '3']]
    assert '2 run(s) finished already' in capsys.readouterr().out
    # runs asked for earlier start first, whatever order a call lists them in
    recorder = Recorder(0, 0)
    assert reproduce.main(['--seeds', '4', '3', '--out', str(out), *FLAGS], runner=recorder) == 0
    assert [c[5] for c in recorder.commands] == ['3', '4']
    # the report knows the added runs: planned, unfinished, not averaged
    assert reproduce.main(['--out', str(out), '--report']) == 0
    table = json.loads((out / 'table.json').read_text())
    assert table['datasets']['synthetic']['seeds'] == [1, 2] and [u['seed'] for u in table['unfinished']] == [3, 4]


def test_a_plan_written_as_datasets_and_seeds_is_their_product(finished, tmp_path, capsys):
    out = tmp_path / 'out'
    shutil.copytree(finished, out)
    (out / 'reproduce.json').write_text(json.dumps({'datasets': ['synthetic'], 'seeds': [1, 2], 'main_flags': FLAGS}))
    assert reproduce.main(['--out', str(out), *FLAGS], runner=never_runs) == 0
    assert '2 run(s) finished already, skipped' in capsys.readouterr().out
    assert reproduce.main(['--out', str(out), '--seeds', '1', '2', *FLAGS], runner=never_runs) == 0
    assert 'added to the plan' not in capsys.readouterr().out
    assert 'datasets' in json.loads((out / 'reproduce.json').read_text())  # unchanged: nothing was added


def test_bad_or_own_main_flags_are_one_line(tmp_path, capsys):
    for extra, message in ((['--epochz', '3'], 'unrecognized arguments: --epochz 3'),
                           (['--random_seed', '5'], '--random_seed is set by reproduce.py'),
                           (['--hidden_size', '9'], '--hidden_size 9 is not divisible by --heads 2'),
                           (['--seeds', '3', '3'], '--seeds lists 3 twice')):
        assert call(tmp_path / 'out', *extra, runner=never_runs) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and message in err
    assert not (tmp_path / 'out').exists()  # nothing recorded for a refused first call


def test_report_lists_an_unfinished_run_and_does_not_average_it(finished, tmp_path, capsys):
    out = tmp_path / 'out'
    shutil.copytree(finished, out)
    validations = results(out, 2)['validations']
    os.remove(out / 'synthetic' / 'seed_2' / 'results.json')  # seed 2: checkpoint only, as if interrupted
    assert reproduce.main(['--out', str(out), '--report']) == 0
    table = json.loads((out / 'table.json').read_text())
    entry = table['datasets']['synthetic']
    assert entry['seeds'] == [1]
    assert table['unfinished'] == [{'dataset': 'synthetic', 'seed': 2, 'epoch': 2, 'started': True}]
    for name in reproduce.PAPER_METRICS:
        assert entry['measured'][name] == {'mean': results(out, 1)['test'][name], 'std': None,
                                           'values': [results(out, 1)['test'][name]]}
    md = (out / 'table.md').read_text()
    assert '- unfinished: synthetic 2 (epoch 2)' in md and '+- n/a' in md

    # The next call resumes it from its checkpoint, after a progress line read from that checkpoint.
    recorder = Recorder(0)
    capsys.readouterr()
    assert reproduce.main(['--out', str(out), *FLAGS], runner=recorder) == 0
    [cmd] = recorder.commands
    assert cmd[1:] == ['main.py', '--resume', str(out / 'synthetic' / 'seed_2'), '--log_file', '']
    best = max(v['NDCG@10'] for v in validations)
    assert re.search(rf'synthetic seed 2: resuming at epoch 2/2, best valid NDCG@10 {best:.4f} \(epoch \d\), '
                     r'\d:\d\d:\d\d elapsed, at most 0:00:00 left', capsys.readouterr().out)


def test_the_report_names_a_folder_inside_the_repository_relative_to_it(finished, tmp_path, monkeypatch):
    """table.md is committed as evidence: it names --out from the repository root, never by a machine's path."""
    monkeypatch.setattr(reproduce, 'REPO', str(tmp_path))
    out = tmp_path / 'runs' / 'table_here'
    shutil.copytree(finished, out)
    assert reproduce.main(['--out', str(out), '--report']) == 0
    assert json.loads((out / 'table.json').read_text())['out'] == os.path.join('runs', 'table_here')
    md = (out / 'table.md').read_text()
    assert f'Runs in `{os.path.join("runs", "table_here")}`' in md and str(tmp_path) not in md


def test_export_copies_the_report_and_finished_runs_without_checkpoints_or_machine_paths(finished, tmp_path,
                                                                                          monkeypatch, capsys):
    """--export writes what results/ commits: the report and each finished run's evidence, no checkpoint, no
    unfinished run, and the repository's own path written relative to it; everything else as the run wrote it."""
    out = tmp_path / 'runs' / 'exported'
    shutil.copytree(finished, out)
    for path in out.rglob('*.*'):  # as if the runs had been made here, in the repository's runs/exported
        if path.suffix in ('.json', '.csv', '.txt', '.md'):
            path.write_text(path.read_text().replace(str(finished), str(out)))
    os.remove(out / 'synthetic' / 'seed_2' / 'results.json')  # seed 2 unfinished
    monkeypatch.setattr(reproduce, 'REPO', str(tmp_path))
    dest = tmp_path / 'results' / 'exported'
    assert reproduce.main(['--out', str(out), '--export', str(dest)]) == 0
    copied = sorted(str(p.relative_to(dest)) for p in dest.rglob('*') if p.is_file())
    assert copied == sorted(['table.md', 'table.json', 'curves.png'] + [
        os.path.join('synthetic', 'seed_1', name)
        for name in ('results.json', 'metrics.csv', 'config.json', 'log.txt', 'curves.png')])
    for name in copied:
        if not name.endswith('.png'):
            assert str(tmp_path) not in (dest / name).read_text()
    ran = json.loads((out / 'synthetic' / 'seed_1' / 'results.json').read_text())
    exported = json.loads((dest / 'synthetic' / 'seed_1' / 'results.json').read_text())
    assert ran['config']['out_dir'] == str(out / 'synthetic' / 'seed_1')
    assert exported['config']['out_dir'] == os.path.join('runs', 'exported', 'synthetic', 'seed_1')
    exported['config']['out_dir'] = ran['config']['out_dir']
    assert exported == ran
    log = (dest / 'synthetic' / 'seed_1' / 'log.txt').read_text()
    assert f'run dir {os.path.join("runs", "exported", "synthetic", "seed_1")}' in log
    assert (dest / 'synthetic' / 'seed_1' / 'curves.png').read_bytes() == \
        (out / 'synthetic' / 'seed_1' / 'curves.png').read_bytes()
    assert json.loads((dest / 'table.json').read_text())['unfinished'][0]['seed'] == 2
    capsys.readouterr()
    assert reproduce.main(['--out', str(out), '--export', str(out / 'evidence')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'a folder inside --out' in err and not (out / 'evidence').exists()


def test_smoke_results_are_not_counted_in_a_real_reproduction(finished, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(finished, out)
    smoke = results(out, 1)
    smoke['smoke'] = True
    (out / 'synthetic' / 'seed_1' / 'results.json').write_text(json.dumps(smoke))
    assert reproduce.main(['--out', str(out), '--report']) == 0
    table = json.loads((out / 'table.json').read_text())
    assert table['datasets']['synthetic']['seeds'] == [2]
    assert [u['seed'] for u in table['unfinished']] == [1]


def test_parallel_gives_the_sequential_results(finished, tmp_path):
    out = tmp_path / 'out'
    assert call(out, '--parallel', '2') == 0
    for seed in (1, 2):
        assert results(out, seed)['test'] == results(finished, seed)['test']
        assert results(out, seed)['validations'][-1]['NDCG@10'] == results(finished, seed)['validations'][-1]['NDCG@10']


def test_report_on_an_empty_folder_is_one_clear_line(tmp_path, capsys):
    assert reproduce.main(['--out', str(tmp_path), '--report']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith(f'error: nothing to report in {tmp_path}')


def test_a_paused_piece_ends_the_call_with_status_3(tmp_path, capsys):
    recorder = Recorder(3)
    argv = ['--datasets', 'synthetic', '--seeds', '1', '2', '--out', str(tmp_path), '--time_limit', '9m', *FLAGS]
    assert reproduce.main(argv, runner=recorder) == 3
    [cmd] = recorder.commands  # the second run is not started after the first paused
    assert cmd[-2] == '--time_limit' and re.fullmatch(r'5[34]\ds', cmd[-1])
    assert cmd[2:6] == ['--dataset', 'synthetic', '--random_seed', '1']
    out = capsys.readouterr().out
    assert 'synthetic seed 1: paused' in out
    assert ('2 run(s) unfinished; continue with the same command: python reproduce.py '
            + ' '.join(argv)) in out


def test_the_budget_shrinks_and_no_piece_starts_when_it_is_spent(tmp_path, monkeypatch, capsys):
    now = [1000.0]
    monkeypatch.setattr(reproduce.time, 'monotonic', lambda: now[0])

    def runner(cmd, cwd, path):  # each piece "takes" 60 s and finishes
        commands.append(cmd)
        now[0] += 60
        return 0, []
    commands = []
    argv = ['--datasets', 'synthetic', '--seeds', '1', '2', '3', '--out', str(tmp_path), '--time_limit', '2m']
    assert reproduce.main(argv + FLAGS, runner=runner) == 3
    assert [c[-1] for c in commands] == ['120s', '60s']  # nothing left for the third
    assert 'continue with the same command' in capsys.readouterr().out


def test_a_failing_piece_stops_the_call_with_its_status_and_lines(tmp_path, capsys):
    recorder = Recorder(2, 0, tail=['Traceback? no:', 'error: something went wrong'])
    assert call(tmp_path, runner=recorder) == 2
    assert len(recorder.commands) == 1
    err = capsys.readouterr().err
    assert 'synthetic seed 1: main.py exited with status 2' in err and 'error: something went wrong' in err
    assert not (tmp_path / 'table.md').exists()


def test_a_piece_shows_its_log_lines_as_they_come_and_keeps_them_in_stdout_txt(tmp_path, capsys):
    """The real runner: stdout lines reach the console after the run's name, and stdout.txt; the stderr
    tail keeps error lines but not progress bars."""
    path = tmp_path / 'toys' / 'seed_7'
    path.mkdir(parents=True)
    (path / 'stdout.txt').write_text('from the piece before\n')
    script = ("import sys\n"
              "print('epoch    0  loss 9.5000  1.0s', flush=True)\n"
              "sys.stderr.write('train:  50%|#####     | 1/2 [00:01<00:01]\\r')\n"
              "print('valid epoch 0: HR@10 1.0', flush=True)\n"
              "sys.stderr.write('error: the last words\\n')\n"
              "sys.exit(4)\n")
    code, tail = reproduce.SubprocessRunner()([sys.executable, '-c', script], str(tmp_path), str(path))
    assert code == 4 and tail == ['error: the last words']
    out = capsys.readouterr().out
    assert out.splitlines() == ['toys seed 7: epoch    0  loss 9.5000  1.0s', 'toys seed 7: valid epoch 0: HR@10 1.0']
    assert (path / 'stdout.txt').read_text() == ('from the piece before\nepoch    0  loss 9.5000  1.0s\n'
                                                 'valid epoch 0: HR@10 1.0\n')


def test_a_closed_console_does_not_block_a_piece(tmp_path, monkeypatch):
    """With the console gone (a closed pipe), the piece's output must still be read to its end and kept:
    a pipe that is not drained stops the piece once its buffer is full."""
    class ClosedConsole:
        def write(self, text):
            raise BrokenPipeError(32, 'Broken pipe')

        def flush(self):
            raise BrokenPipeError(32, 'Broken pipe')
    monkeypatch.setattr(sys, 'stdout', ClosedConsole())
    path = tmp_path / 'toys' / 'seed_1'
    path.mkdir(parents=True)
    script = "for i in range(20000): print(f'epoch {i:5d}  ' + 'x' * 40)\n"  # about 1 MB, many pipe buffers
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=reproduce.SubprocessRunner()(
        [sys.executable, '-c', script], str(tmp_path), str(path))), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), 'the piece blocked on its unread output'
    assert result['out'] == (0, [])
    lines = (path / 'stdout.txt').read_text().splitlines()
    assert len(lines) == 20000 and lines[-1].startswith('epoch 19999')


def test_sigterm_stops_the_call_without_calling_the_stopped_piece_an_error(tmp_path, capsys):
    class Stopped(Recorder):
        stopped = 0

        def __call__(self, cmd, cwd, path):  # the job scheduler's SIGTERM arrives while the piece runs
            self.commands.append(cmd)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            return 1, ['SIGTERM: stopped at epoch 1 batch 3; checkpoint written.'] if self.stopped else ['not stopped']

        def stop(self):
            self.stopped += 1
    runner, before = Stopped(), signal.getsignal(signal.SIGTERM)
    assert call(tmp_path, runner=runner) == 128 + signal.SIGTERM
    assert len(runner.commands) == 1 and runner.stopped == 1  # the piece was asked to stop, none started after
    captured = capsys.readouterr()
    assert 'synthetic seed 1: paused' in captured.out and 'exited with status' not in captured.err
    assert 'stopped by SIGTERM; continue with the same command' in captured.out
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back


def test_a_real_time_limit_cuts_the_reproduction_into_calls_that_end_in_the_table(finished, tmp_path, monkeypatch,
                                                                                    capsys):
    """main.py's own --time_limit, end to end: a 2 s budget is below the margin a run keeps for its first
    checkpoint write, so the first piece stops at once with exit 3 on any machine; later calls resume both runs
    and end with the table, whose metrics are those of the uncut reproduction."""
    monkeypatch.setattr(reproduce, 'MIN_PIECE_SECONDS', 1)
    out = tmp_path / 'cut'
    assert call(out, '--time_limit', '2s') == 3
    assert 'checkpoint.pt' in os.listdir(out / 'synthetic' / 'seed_1')
    assert not os.path.exists(out / 'synthetic' / 'seed_1' / 'results.json') and not (out / 'table.json').exists()
    calls = 1
    while call(out, '--time_limit', '20s') == 3:  # each piece trains until its own budget runs out
        calls += 1
        assert calls < 20, 'the reproduction makes no progress'
    assert (out / 'table.json').exists()
    with open(out / 'table.json') as f:
        entry = json.load(f)['datasets']['synthetic']
    assert entry['seeds'] == [1, 2]
    for seed in (1, 2):  # the pieces end where the uncut runs end
        assert results(out, seed)['test'] == results(finished, seed)['test']
    runs = [results(out, 1), results(out, 2)]
    for name in reproduce.PAPER_METRICS:
        values = [r['test'][name] for r in runs]
        assert entry['measured'][name]['mean'] == pytest.approx(statistics.mean(values), abs=1e-4)
        assert entry['measured'][name]['std'] == pytest.approx(statistics.stdev(values), abs=1e-4)


def test_a_sasrec_reproduction_stands_beside_the_published_sasrec_under_both_protocols(tmp_path):
    """--model sasrec --test_both_protocols: the table compares with the published SASRec rows (here under the
    name toys, a folder holding synthetic data), with the history ranked and excluded, each row's difference
    computed from the runs' own results.json."""
    import pickle
    from data import make_synthetic
    (tmp_path / 'data' / 'toys').mkdir(parents=True)
    with open(tmp_path / 'data' / 'toys' / 'dataset.pkl', 'wb') as f:
        pickle.dump(make_synthetic(n_users=120, n_items=60, seed=2), f)
    out = tmp_path / 'out'
    flags = ['--model', 'sasrec', '--test_both_protocols', '--data_dir', str(tmp_path / 'data'), '--epochs', '2',
             '--eval_interval', '1', '--hidden_size', '8', '--num_blocks', '1']
    assert reproduce.main(['--datasets', 'toys', '--seeds', '1', '2', '--out', str(out), *flags]) == 0
    table = json.loads((out / 'table.json').read_text())
    assert (table['model'], table['reference']) == ('sasrec', 'published SASRec')
    entry = table['datasets']['toys']
    assert entry['reference'] == {'HR@10': 9.70, 'NDCG@10': 5.80}
    runs = [json.loads((out / 'toys' / f'seed_{s}' / 'results.json').read_text()) for s in (1, 2)]
    for protocol, key in (('history ranked', 'test_history_ranked'), ('history excluded', 'test_history_excluded')):
        row = entry['by_history'][protocol]
        mean = statistics.mean(r[key]['HR@10'] for r in runs)
        assert row['measured']['HR@10']['mean'] == pytest.approx(mean, abs=1e-4)
        assert row['relative_difference']['HR@10'] == pytest.approx((mean - 9.70) / 9.70 * 100, abs=0.01)
        assert set(row['relative_difference']) == {'HR@10', 'NDCG@10'}
    assert entry['by_history']['history ranked']['measured'] == entry['measured']  # the run's own protocol
    md = (out / 'table.md').read_text()
    assert md.startswith('# SASRec: measured test metrics beside published SASRec')
    assert '| published SASRec |  | 9.7000 |' in md
    assert '| measured, history excluded, 2 seeds |' in md and '| paper |' not in md
    assert str(tmp_path) in md  # --out outside the repository is named as given
