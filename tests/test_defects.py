"""Defects of issue 11: explicit flags against --strict, --resume's comparison, --seeds under torchrun, log-copy
names, --recommend's sampling flags and scores() on input that is not left-padded."""
import json
import os

import pytest
import torch

import config
import main
import rundir
import utils

# A run of a few seconds, should a refused command start one after all.
QUICK = ['--dataset', 'synthetic', '--hidden_size', '16', '--num_blocks', '1', '--log_file', '', '--epochs', '1',
         '--limit_train_batches', '1', '--limit_eval_batches', '1']


@pytest.mark.parametrize('flags, message', [
    (['--attention_mask', 'causal'], '--strict sets --attention_mask key; drop --strict or --attention_mask causal'),
    (['--select_metric', 'HR@10'], '--strict sets --select_metric NDCG@10; drop --strict or --select_metric HR@10'),
    (['--metric_average', 'batch'], '--strict sets --metric_average user; drop --strict or --metric_average batch'),
    (['--rank_padding'], '--strict sets --no-rank_padding; drop --strict or --rank_padding'),
])
def test_strict_refuses_an_explicit_flag_that_contradicts_it(tmp_path, capsys, flags, message):
    assert main.main(QUICK + ['--strict', '--out_dir', str(tmp_path / 'run')] + flags) == 2
    err = capsys.readouterr().err
    assert err == f'error: {message}\n'


def test_strict_accepts_explicit_flags_equal_to_its_settings():
    cfg = config.resolve(['--strict', '--attention_mask', 'key', '--select_metric', 'NDCG@10',
                             '--no-rank_padding', '--exclude_history', '--metric_average', 'user'])
    assert (cfg.attention_mask, cfg.select_metric, cfg.rank_padding, cfg.metric_average) == \
        ('key', 'NDCG@10', False, 'user')


def test_strict_with_sasrec_still_names_a_diffusion_flag():
    with pytest.raises(ValueError, match='does not apply to --model sasrec'):
        config.resolve(['--model', 'sasrec', '--strict', '--attention_mask', 'causal'])


def test_resume_compares_normalised_flags(tmp_path):
    """--optimizer adam is Adam, and --metric_ks in another order (or repeated) are the same cut-offs."""
    run_dir = str(tmp_path / 'run')
    assert main.main(QUICK + ['--epochs', '2', '--eval_interval', '1', '--optimizer', 'adam', '--metric_ks', '10', '5',
                              '10', '--out_dir', run_dir]) == 0
    with open(f'{run_dir}/config.json') as f:
        stored = json.load(f)
    assert (stored['optimizer'], stored['metric_ks']) == ('Adam', [5, 10])  # stored canonical
    os.remove(f'{run_dir}/results.json')  # resumable again, as if stopped after its last validation
    for flags in (['--optimizer', 'Adam'], ['--optimizer', 'adam'], ['--metric_ks', '5', '10'],
                  ['--metric_ks', '10', '5', '5']):
        cfg = config.resolve(['--resume', run_dir] + flags)
        assert (cfg.optimizer, cfg.metric_ks) == ('Adam', [5, 10])
    with pytest.raises(ValueError, match="optimizer='Adam' .given 'SGD'"):
        config.resolve(['--resume', run_dir, '--optimizer', 'sgd'])


def seeds_as_rank(monkeypatch, tmp_path, rank):
    """run_seeds as process `rank` of 2 under torchrun, with run() stubbed out and rank 0's base folder
    chosen by rank 0 alone (dist_util.from_rank0 on rank 1 stands for the broadcast it receives)."""
    base = tmp_path / 'base'
    calls = []
    monkeypatch.setattr(main.dist_util, 'torchrun_env', lambda: (rank, 2, rank))
    monkeypatch.setattr(main.dist_util, 'init_distributed', lambda device, rank, world: None)
    monkeypatch.setattr(main.dist_util, 'from_rank0',
                        lambda make, r, world: make() if r == 0 else str(base))
    test = {'HR@10': 1.0}

    def fake_run(cfg):
        calls.append(cfg.out_dir)
        return {'dataset': 'synthetic', 'test': dict(test), 'diversity': {}}

    checked = []
    monkeypatch.setattr(main, 'run', fake_run)
    monkeypatch.setattr(main, 'check_start', lambda cfg: checked.append(cfg.out_dir))  # it makes folders on rank 1
    cfg = config.resolve(QUICK + ['--seeds', '1', '2', '--out_dir', str(base)])
    main.run_seeds(cfg)
    assert checked == calls  # each run's own folders are checked before it starts
    return base, calls


def test_seeds_under_torchrun_rank1_only_runs(monkeypatch, tmp_path, capsys):
    base, calls = seeds_as_rank(monkeypatch, tmp_path, rank=1)
    assert calls == [str(base / 'seed_1'), str(base / 'seed_2')]  # it takes part in every run
    assert not base.exists()  # no folder of its own, no aggregate.json
    assert capsys.readouterr().out == ''


def test_seeds_under_torchrun_rank0_makes_the_folder_and_writes_the_aggregate(monkeypatch, tmp_path, capsys):
    base, calls = seeds_as_rank(monkeypatch, tmp_path, rank=0)
    assert calls == [str(base / 'seed_1'), str(base / 'seed_2')]
    assert sorted(os.listdir(base)) == ['aggregate.json']
    with open(base / 'aggregate.json') as f:
        assert json.load(f)['metrics']['HR@10'] == {'mean': 1.0, 'std': 0.0, 'values': [1.0, 1.0]}
    assert 'aggregate written to' in capsys.readouterr().out


def test_write_json_replaces_through_a_unique_synced_temporary_file(monkeypatch, tmp_path):
    replaced, synced = [], []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(utils.os, 'replace', lambda src, dst: (replaced.append((src, dst)), real_replace(src, dst)))
    monkeypatch.setattr(utils.os, 'fsync', lambda fd: (synced.append(fd), real_fsync(fd)))
    target = str(tmp_path / 'a.json')
    utils.write_json({'x': 1}, target)
    utils.write_json({'x': 2}, target)
    (first, _), (second, _) = replaced
    assert first != second and all(os.path.dirname(src) == str(tmp_path) for src, _ in replaced)
    assert [dst for _, dst in replaced] == [target, target] and len(synced) == 2
    with open(target) as f:
        assert json.load(f) == {'x': 2}
    assert os.listdir(tmp_path) == ['a.json']


def test_log_copies_of_two_seed_experiments_do_not_collide(tmp_path):
    logs = tmp_path / 'log'
    for name in ('a', 'b'):
        argv = QUICK[:QUICK.index('--log_file')] + QUICK[QUICK.index('--log_file') + 2:]
        assert main.main(argv + ['--seeds', '1', '--log_file', str(logs), '--out_dir', str(tmp_path / name)]) == 0
    copies = sorted(os.listdir(logs))
    assert [c[:-len('_12345678.log')] for c in copies] == ['synthetic_a_seed_1', 'synthetic_b_seed_1']
    for copy in copies:  # each copy holds one run's log: its own run dir, named once
        with open(logs / copy) as f:
            text = f.read()
        assert text.count('run dir') == 1
        run_dir = text.split('run dir ')[1].split(';')[0].split('\n')[0]
        with open(os.path.join(run_dir, 'log.txt')) as f:
            assert f.read() == text
    assert rundir.log_copy_name('synthetic', str(tmp_path / 'a' / 'seed_1')) != \
        rundir.log_copy_name('synthetic', str(tmp_path / 'b' / 'seed_1'))


def full_attention(self, h, x_t, t_scaled, mask, lam=None):
    """Approximator.forward as it runs on CUDA: every row through the whole attention, no windows."""
    return self.transformer(self.noisy_input(h, x_t, t_scaled, lam), mask, last_only=True)[:, -1]


@pytest.mark.parametrize('padding', ['right', 'gap'])
def test_scores_of_input_not_left_padded_equal_the_unwindowed_path(monkeypatch, padding):
    from diffurec import Approximator
    from model import DiffuRec
    torch.manual_seed(0)
    model = DiffuRec(30, hidden_size=16, num_blocks=2, heads=2, diffusion_steps=4).eval()
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(1, 31, (6, 8), generator=g)
    seq[:3, :4] = 0  # left-padded rows
    if padding == 'right':
        seq[3:, 5:] = 0
    else:  # a zero between items
        seq[3:, :2], seq[3:, 4] = 0, 0
    torch.manual_seed(2)
    got = model.scores(seq)
    monkeypatch.setattr(Approximator, 'forward', full_attention)
    torch.manual_seed(2)
    expected = model.scores(seq)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_left_padded_input_still_takes_the_windowed_path(monkeypatch):
    from diffurec import MultiHeadAttention
    from model import DiffuRec
    calls = []
    windowed = MultiHeadAttention.windowed
    monkeypatch.setattr(MultiHeadAttention, 'windowed', lambda self, *a: (calls.append(1), windowed(self, *a))[1])
    torch.manual_seed(0)
    model = DiffuRec(30, hidden_size=16, num_blocks=2, heads=2, diffusion_steps=4).eval()
    seq = torch.randint(1, 31, (4, 8))
    seq[:, :3] = 0
    model.scores(seq)
    assert calls


def test_write_atomic_leaves_the_old_file_when_the_write_fails(tmp_path):
    target = str(tmp_path / 'a.json')
    utils.write_json({'x': 1}, target)

    def failing(f):
        f.write('{"x": ')
        raise RuntimeError('disk full')

    with pytest.raises(RuntimeError, match='disk full'):
        utils.write_atomic(target, failing)
    with open(target) as f:
        assert json.load(f) == {'x': 1}
    assert os.listdir(tmp_path) == ['a.json']
