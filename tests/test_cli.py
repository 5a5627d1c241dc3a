"""main.py end to end: short runs, outputs, and a clear one-line error for every bad input."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

import config
import main
import utils
from data import make_synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--hidden_size', '32', '--num_blocks', '1', '--log_file', '']


def run_main(args, capsys=None):
    rc = main.main(args)
    err = capsys.readouterr().err if capsys else ''
    return rc, err


def read_results(run_dir):
    with open(os.path.join(run_dir, 'results.json')) as f:
        return json.load(f)


def kept_epoch(validations, names=('HR@5', 'HR@10', 'HR@20', 'NDCG@5', 'NDCG@10', 'NDCG@20')):
    """The reference's rule, written out: the last validation at which any metric beat its best so far."""
    best, kept = dict.fromkeys(names, float('-inf')), None
    for row in validations:
        improved = [m for m in names if row[m] > best[m]]
        for m in improved:
            best[m] = row[m]
        if improved:
            kept = row['epoch']
    return kept


def test_short_synthetic_run_learns_and_writes_everything(tmp_path):
    out = str(tmp_path / 'run')
    rc = main.main(['--dataset', 'synthetic', '--epochs', '11', '--eval_interval', '5', '--out_dir', out,
                    '--long_head', '--epoch_time_avg', '--lr', '0.01'] + TINY)
    assert rc == 0
    res = read_results(out)
    for key in ('dataset', 'config', 'test', 'best_valid', 'best_epoch', 'epochs_run', 'epoch_seconds',
                'n_params', 'device', 'torch_version', 'smoke', 'hardware'):
        assert key in res
    assert res['hardware'] == utils.hardware(torch.device('cpu')) and f'{os.cpu_count()} cores' in res['hardware']
    assert res['smoke'] is False and res['epochs_run'] == 11 and len(res['epoch_seconds']) == 11
    assert list(res['test']) == ['HR@5', 'HR@10', 'HR@20', 'NDCG@5', 'NDCG@10', 'NDCG@20']
    chance = 10 / 200 * 100
    assert res['test']['HR@10'] > 10 * chance, res['test']  # the synthetic pattern is learnt
    hr10 = [(v['HR@10'], v['epoch']) for v in res['validations']]
    assert res['best_epoch']['HR@10'] == max(hr10, key=lambda pair: pair[0])[1]  # the first of equal maxima
    assert res['kept_epoch'] == kept_epoch(res['validations'])
    assert set(res['long_head']) == {'hot', 'cold', 'short', 'mid_short', 'mid', 'mid_long', 'long'}
    assert res['epoch_time_avg'] > 0
    with open(os.path.join(out, 'metrics.csv')) as f:
        rows = f.read().strip().splitlines()
    assert rows[0].startswith('epoch,loss,seconds,HR@5') and [r.split(',')[0] for r in rows[1:]] == ['5', '10']
    with open(os.path.join(out, 'config.json')) as f:
        assert json.load(f)['epochs'] == 11
    assert os.path.isfile(os.path.join(out, 'checkpoint.pt')) and os.path.isfile(os.path.join(out, 'log.txt'))


@pytest.mark.parametrize('epochs', [2, 3])  # epochs < and == eval_interval: no validation runs
def test_final_model_is_tested_when_no_validation_ran(tmp_path, epochs):
    out = str(tmp_path / 'run')
    assert main.main(['--dataset', 'synthetic', '--epochs', str(epochs), '--eval_interval', '3',
                      '--limit_train_batches', '2', '--out_dir', out] + TINY) == 0
    res = read_results(out)
    assert res['kept_epoch'] is None and res['best_valid'] == {} and res['smoke'] is True
    assert set(res['test']) == {'HR@5', 'HR@10', 'HR@20', 'NDCG@5', 'NDCG@10', 'NDCG@20'}


def test_real_dataset_smoke_run(tmp_path, real_data_dir):
    out = str(tmp_path / 'run')
    assert main.main(['--dataset', 'toys', '--data_dir', str(real_data_dir), '--epochs', '2',
                      '--eval_interval', '1', '--limit_train_batches', '2', '--limit_eval_batches', '1',
                      '--out_dir', out] + TINY) == 0
    res = read_results(out)
    assert res['smoke'] is True and res['epochs_run'] == 2 and res['kept_epoch'] == 1
    assert res['data_checksum'] == '54734fb949dd6019'


def write_pickle(root, name, obj):
    os.makedirs(root / name, exist_ok=True)
    with open(root / name / 'dataset.pkl', 'wb') as f:
        pickle.dump(obj, f)


class Evil:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


@pytest.mark.parametrize('case, args, message', [
    ('missing', ['--dataset', 'mine'], 'file is missing'),
    ('corrupt', ['--dataset', 'corrupt'], 'not a readable pickle'),
    ('evil', ['--dataset', 'evil'], 'module'),
    ('structure', ['--dataset', 'broken'], 'val[0] must be a list of exactly one'),
    ('flags', ['--dataset', 'synthetic', '--hidden_size', '30'], 'divisible'),
    ('flags', ['--dataset', 'synthetic', '--dropout', '1.5'], 'dropout'),
    ('flags', ['--dataset', 'synthetic', '--lr', '-1'], 'lr'),
    ('flags', ['--dataset', 'synthetic', '--noise_schedule', 'linear', '--diffusion_steps', '10'], 'diffusion_steps'),
    ('flags', ['--dataset', 'synthetic', '--metric_ks', '5', '500'], 'metric_ks'),
    ('flags', ['--dataset', 'synthetic', '--select_metric', 'HR@7'], 'select_metric'),
    ('flags', ['--dataset', 'synthetic', '--seed', '5'], 'unrecognized arguments: --seed 5'),  # not --seeds
    ('flags', ['--dataset', 'synthetic', '--num_gpu', '2'], 'torchrun'),
    ('flags', ['--dataset', 'synthetic', '--diversity_measure'], 'category'),
    ('flags', ['--dataset', 'synthetic', '--out_dir', '/proc/diffurec_run'], 'out_dir'),
])
def test_bad_input_gives_one_clear_line(tmp_path, capsys, case, args, message):
    data = make_synthetic(n_users=20, n_items=30)
    (tmp_path / 'corrupt').mkdir()
    (tmp_path / 'corrupt' / 'dataset.pkl').write_bytes(b'\x80\x04not a pickle at all')
    write_pickle(tmp_path, 'evil', {'train': Evil()})
    broken = dict(data, val={u: [1, 2] for u in data['val']})
    write_pickle(tmp_path, 'broken', broken)
    argv = args + ['--data_dir', str(tmp_path), '--log_file', '']
    if '--out_dir' not in args:
        argv += ['--out_dir', str(tmp_path / 'run')]
    rc, err = run_main(argv, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], err
    assert 'Traceback' not in err


def test_cli_error_has_no_traceback_and_help_lists_every_reference_flag(tmp_path):
    proc = subprocess.run([sys.executable, 'main.py', '--dataset', 'nothing_here', '--data_dir', str(tmp_path),
                           '--log_file', ''], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr and proc.stderr.startswith('error: ')
    help_text = subprocess.run([sys.executable, 'main.py', '--help'], cwd=REPO, capture_output=True, text=True,
                               timeout=120).stdout
    for flag in ('dataset', 'log_file', 'random_seed', 'max_len', 'device', 'num_gpu', 'batch_size', 'hidden_size',
                 'dropout', 'emb_dropout', 'hidden_act', 'num_blocks', 'epochs', 'decay_step', 'gamma', 'metric_ks',
                 'optimizer', 'lr', 'loss_lambda', 'weight_decay', 'momentum', 'schedule_sampler_name',
                 'diffusion_steps', 'lambda_uncertainty', 'noise_schedule', 'rescale_timesteps', 'eval_interval',
                 'patience', 'description', 'long_head', 'diversity_measure', 'epoch_time_avg'):
        assert f'--{flag}' in help_text, flag


def test_reference_defaults_are_kept():
    cfg = config.resolve(['--dataset', 'amazon_beauty'])
    assert (cfg.batch_size, cfg.hidden_size, cfg.num_blocks, cfg.epochs, cfg.lr, cfg.dropout, cfg.emb_dropout) == \
        (512, 128, 4, 500, 0.001, 0.1, 0.3)
    assert (cfg.diffusion_steps, cfg.noise_schedule, cfg.schedule_sampler_name, cfg.lambda_uncertainty) == \
        (32, 'trunc_lin', 'lossaware', 0.001)
    assert (cfg.eval_interval, cfg.patience, cfg.decay_step, cfg.gamma, cfg.random_seed, cfg.max_len) == \
        (20, 5, 100, 0.1, 1997, 50)
    assert (cfg.optimizer, cfg.weight_decay, cfg.metric_ks, cfg.heads, cfg.hidden_act) == \
        ('Adam', 0.0, [5, 10, 20], 4, 'gelu')
    assert cfg.rescale_timesteps is True and cfg.long_head is False and cfg.device == 'auto'
    assert config.resolve(['--no-rescale_timesteps']).rescale_timesteps is False
    with pytest.raises(ValueError, match='unrecognized arguments: False'):  # booleans are real: no "--long_head False"
        config.resolve(['--long_head', 'False'])


@pytest.mark.parametrize('emulated', [True, False])
def test_bf16_on_a_cpu_without_native_bf16_warns_once(tmp_path, monkeypatch, emulated):
    """On a CPU whose bf16 products are emulated (no AVX-512 BF16 or AMX) --precision bf16 runs, with a
    warning that names the CPU's lack and the fix; where they are native, no warning."""
    import warnings
    monkeypatch.setattr(utils, 'bf16_is_emulated', lambda device: emulated)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert main.main(['--dataset', 'synthetic', '--epochs', '1', '--limit_train_batches', '2',
                          '--limit_eval_batches', '1', '--precision', 'bf16', '--out_dir', str(tmp_path / 'run')]
                         + TINY) == 0
    said = [str(w.message) for w in caught if 'no native bf16' in str(w.message)]
    assert len(said) == (1 if emulated else 0), said
    assert all('use --precision fp32' in line for line in said)


@pytest.mark.parametrize('native, said', [(True, ', native bf16'), (False, ', bf16 emulated'), (None, '')])
def test_hardware_names_the_cpu_model_its_cores_and_its_bf16(monkeypatch, native, said):
    """results.json's `hardware`: the CPU's model as /proc/cpuinfo gives it, then cores and bf16 where known."""
    monkeypatch.setattr(utils, 'cpu_has_native_bf16', lambda: native)
    name = utils.hardware(torch.device('cpu'))
    assert name.endswith(f', {os.cpu_count()} cores{said}'), name
    if os.path.exists('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as f:
            model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
        assert name.startswith(model + ', '), name


def test_bf16_run_reaches_fp32_metrics_within_noise(tmp_path):
    """A short bf16 run (autocast training, bf16 approximator when sampling) learns as well as fp32."""
    results_by = {}
    for precision in ('fp32', 'bf16'):
        out = str(tmp_path / precision)
        assert main.main(['--dataset', 'synthetic', '--epochs', '6', '--eval_interval', '5', '--lr', '0.01',
                          '--precision', precision, '--out_dir', out] + TINY) == 0
        results_by[precision] = read_results(out)['test']
    assert results_by['fp32']['HR@10'] > 40
    for metric in ('HR@10', 'NDCG@10'):
        assert abs(results_by['bf16'][metric] - results_by['fp32'][metric]) < 8, results_by
