"""--tensorboard: one point per epoch and per validation, exactly once across a resumed run."""
import json
import os
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main
from model import DiffuRec

# 5 epochs of 3 training batches, a validation (2 batches) after epochs 2 and 4.
SMALL = ['--dataset', 'synthetic', '--hidden_size', '16', '--num_blocks', '1', '--diffusion_steps', '4',
         '--log_file', '', '--epochs', '5', '--eval_interval', '2', '--limit_train_batches', '3',
         '--limit_eval_batches', '2']
METRICS = ['HR@5', 'HR@10', 'HR@20', 'NDCG@5', 'NDCG@10', 'NDCG@20']


def scalars(log_dir):
    """{tag: [(step, value)]} as TensorBoard shows them (points orphaned by a restart purged)."""
    events = EventAccumulator(log_dir)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()['scalars']}


def check_board(board, run_dir):
    with open(os.path.join(run_dir, 'results.json')) as f:
        res = json.load(f)
    assert sorted(board) == sorted(['train/loss', 'train/lr', 'train/seconds', 'valid/seconds']
                                   + [f'valid/{m}' for m in METRICS])
    for tag in ('train/loss', 'train/lr', 'train/seconds'):
        assert [step for step, _ in board[tag]] == [0, 1, 2, 3, 4], tag
    assert [v for _, v in board['train/loss']] == pytest.approx(res['epoch_losses'], rel=1e-6)
    assert [v for _, v in board['train/lr']] == pytest.approx([0.001] * 5)
    for m in METRICS:
        assert board[f'valid/{m}'] == [(v['epoch'], pytest.approx(v[m], rel=1e-6)) for v in res['validations']]
    assert [step for step, _ in board['valid/seconds']] == [2, 4]


def test_a_run_cut_by_its_time_limit_logs_every_epoch_once(tmp_path, clock, capsys):
    run_dir, log_dir = str(tmp_path / 'run'), str(tmp_path / 'tb')
    # 3 epochs (90 units); the first validation starts (5 left, the save guess) and is cut after one batch.
    assert main.main(SMALL + ['--out_dir', run_dir, '--tensorboard', log_dir, '--time_limit', '95'], clock=clock) == 3
    assert 'during the validation of epoch 2' in capsys.readouterr().err
    assert main.main(['--resume', run_dir], clock=clock) == 0  # --tensorboard kept from the run
    assert len(os.listdir(log_dir)) == 2
    check_board(scalars(log_dir), run_dir)


def test_a_resumed_run_hides_what_the_crashed_one_logged_after_its_checkpoint(tmp_path, monkeypatch):
    run_dir, log_dir = str(tmp_path / 'run'), str(tmp_path / 'tb')
    forward, calls = DiffuRec.forward, {'n': 0}

    def crashing(self, *args, **kwargs):
        calls['n'] += 1
        if calls['n'] == 3 * 4 + 2:  # epoch 4, batch 1: epoch 3 was logged after the checkpoint of epoch 2
            raise RuntimeError('crash')
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(DiffuRec, 'forward', crashing)
    with pytest.raises(RuntimeError, match='crash'):
        main.main(SMALL + ['--out_dir', run_dir, '--tensorboard', log_dir])
    monkeypatch.setattr(DiffuRec, 'forward', forward)
    crashed = scalars(log_dir)
    assert [step for step, _ in crashed['train/loss']] == [0, 1, 2, 3]
    assert main.main(['--resume', run_dir, '--tensorboard', log_dir]) == 0  # epochs 3 and 4 again
    check_board(scalars(log_dir), run_dir)


def test_without_tensorboard_the_run_stops_before_training_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)  # import fails as if not installed
    run_dir = tmp_path / 'run'
    rc = main.main(SMALL + ['--out_dir', str(run_dir), '--tensorboard', str(tmp_path / 'tb')])
    captured = capsys.readouterr()
    assert rc == 2 and captured.err == 'error: --tensorboard needs the tensorboard package: pip install tensorboard\n'
    assert not run_dir.exists() and not (tmp_path / 'tb').exists()
