"""Several processes (torchrun, gloo on the CPU) train and evaluate exactly as one process does."""
import json
import os
import pickle
import socket
import subprocess
import sys

import pytest
import torch

import main
from data import build_samples, make_synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--hidden_size', '32', '--num_blocks', '1', '--log_file', '']
# No dropout and no uncertainty noise: x0_hat no longer depends on x_t or t, and the reverse process returns it
# exactly (posterior coef1[0] = 1, coef2[0] = 0), so training and evaluation are deterministic.
DETERMINISTIC = ['--dropout', '0', '--emb_dropout', '0', '--lambda_uncertainty', '0']


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(args, nproc=2):
    """Run main.py under torchrun with nproc CPU processes; returns the finished process (asserts success)."""
    env = {k: v for k, v in os.environ.items() if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK')}
    env.update(MASTER_ADDR='127.0.0.1', OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc),
           '--master_addr', '127.0.0.1', '--master_port', str(free_port()), 'main.py', *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def read_results(run_dir):
    with open(os.path.join(run_dir, 'results.json')) as f:
        return json.load(f)


def test_two_processes_train_and_evaluate_exactly_like_one(tmp_path):
    data = make_synthetic(n_users=35, n_items=50, seed=0)
    os.makedirs(tmp_path / 'tiny')
    with open(tmp_path / 'tiny' / 'dataset.pkl', 'wb') as f:
        pickle.dump(data, f)
    batch = 104
    # SGD, not Adam: Adam's steps ignore the scale of the gradient (a wrong loss scale would go unseen), and
    # blow up the rounding noise of gradients that are zero in exact arithmetic (e.g. the key biases).
    # 417 samples: four batches of 104 and a last batch of one row, so one process gets an empty slice
    # and trains on a zero-weight stand-in row.
    assert len(build_samples(data, 20)['train'][1]) % batch == 1
    # Categories by original id (= the item id here): items 1..40 in pairs c0..c19, item 3 also in 'extra',
    # items 41..50 in none; so every diversity value of the test top-K is in results.json.
    with open(tmp_path / 'categories.csv', 'w') as f:
        f.write('item,category\n' + ''.join(f'{i},c{(i - 1) // 2}\n' for i in range(1, 41)) + '3,extra\n')
    args = ['--dataset', 'tiny', '--data_dir', tmp_path, '--max_len', 20, '--batch_size', batch, '--epochs', 2,
            '--eval_interval', 1, '--optimizer', 'SGD', '--lr', 0.1, '--category_file', tmp_path / 'categories.csv',
            '--diversity_measure'] + TINY + DETERMINISTIC
    one, two = tmp_path / 'one', tmp_path / 'two'
    assert main.main([str(a) for a in args + ['--out_dir', one]]) == 0
    proc = torchrun(args + ['--out_dir', two])

    r1, r2 = read_results(one), read_results(two)
    assert (r1['world_size'], r2['world_size']) == (1, 2)
    assert r2['epoch_losses'] == pytest.approx(r1['epoch_losses'], rel=1e-5)
    assert r1['epoch_losses'][1] < r1['epoch_losses'][0]  # it trained
    assert r2['best_valid'] == pytest.approx(r1['best_valid'], abs=1e-5)
    assert r2['test'] == pytest.approx(r1['test'], abs=1e-5)
    # Diversity of the test top-K lists gathered from both processes (in another row order: ild's float sum
    # may differ in its last bits) equals the one-process value.
    assert set(r1['diversity']) == {'coverage@20', 'ild@20', 'categories@20', 'category_coverage@20'}
    assert r2['diversity'] == pytest.approx(r1['diversity'], abs=1e-4)
    assert r1['diversity']['ild@20'] > 0 and r1['diversity']['categories@20'] > 1
    m1 = torch.load(one / 'checkpoint.pt', weights_only=True)['model']
    m2 = torch.load(two / 'checkpoint.pt', weights_only=True)['model']
    assert m1.keys() == m2.keys()
    for name in m1:
        torch.testing.assert_close(m2[name], m1[name], rtol=0, atol=1e-5, msg=name)

    # Only rank 0 prints and writes: every line once.
    with open(two / 'log.txt') as f:
        log = f.read()
    assert log.count('valid epoch 1:') == 1 and proc.stdout.count('valid epoch 1:') == 1
    assert '2 processes, 52 rows each per batch' in log
    assert sorted(set(os.listdir(two)) - {'curves.png'}) == ['checkpoint.pt', 'config.json', 'log.txt', 'metrics.csv',
                                                          'results.json']


def test_two_processes_with_the_default_model_learn(tmp_path):
    out = tmp_path / 'run'
    torchrun(['--dataset', 'synthetic', '--epochs', 4, '--eval_interval', 3, '--lr', 0.01, '--out_dir', out] + TINY)
    res = read_results(out)
    chance = 10 / 200 * 100
    assert res['world_size'] == 2 and res['epochs_run'] == 4 and res['kept_epoch'] == 3
    assert res['test']['HR@10'] > 4 * chance, res['test']


@pytest.mark.parametrize('env, args, message', [
    ({'WORLD_SIZE': '2', 'RANK': '0', 'LOCAL_RANK': '0'}, ['--batch_size', '33'], 'multiple of 2'),
    ({'WORLD_SIZE': '2', 'RANK': '1', 'LOCAL_RANK': '1'}, ['--device', 'cuda:0'], 'LOCAL_RANK'),
    ({'WORLD_SIZE': '2'}, [], 'RANK'),
])
def test_flags_that_do_not_suit_torchrun_give_one_clear_line(tmp_path, capsys, monkeypatch, env, args, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rc = main.main(['--dataset', 'synthetic', '--out_dir', str(tmp_path / 'run')] + TINY + args)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith('error: ') and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / 'run').exists()


def test_seeds_under_two_processes_write_one_folder_and_one_aggregate(tmp_path):
    out = tmp_path / 'seeds'
    proc = torchrun(['--dataset', 'synthetic', '--seeds', 1, 2, '--epochs', 1, '--limit_train_batches', 1,
                     '--limit_eval_batches', 1, '--out_dir', out] + TINY)
    assert sorted(os.listdir(out)) == ['aggregate.json', 'seed_1', 'seed_2']
    assert proc.stdout.count('aggregate written to') == 1
    with open(out / 'aggregate.json') as f:
        assert json.load(f)['seeds'] == [1, 2]


@pytest.mark.parametrize('world', ['1', '2'])
def test_a_torchrun_process_exits_with_its_status_and_output_but_without_teardown(world):
    """dist_util.exit_process: one of several processes leaves by os._exit (no atexit handler, so no interpreter
    teardown for gloo's threads to abort in), its status and buffered output intact; a lone process exits as
    usual."""
    script = ('import atexit, sys, dist_util\n'
              'atexit.register(lambda: print("teardown ran"))\n'
              'print("buffered line", end="")\n'
              'dist_util.exit_process(3)\n')
    env = {**os.environ, 'WORLD_SIZE': world}
    proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.startswith('buffered line')
    assert ('teardown ran' in proc.stdout) is (world == '1'), proc.stdout
