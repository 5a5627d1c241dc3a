"""rundir.py: the one reader of run folders (saved configs of old runs, the finished check, progress)."""
import json

import pytest

import rundir


def test_saved_config_completes_an_old_config_and_falls_back_to_config_json(tmp_path):
    old = {'dataset': 'toys', 'hidden_size': 16}  # a run from before --model, --tensorboard, --approximator, ...
    assert rundir.saved_config(str(tmp_path), {'config': old}) == {
        **old, 'model': 'diffurec', 'tensorboard': None, 'approximator': 'transformer', 'sample_steps': None,
        'precision': 'fp32', 'preset': 'default', 'loss': 'full', 'negatives': 256, 'inner_size': None,
        'block': 'preln', 'padding': 'left', 'init': 'xavier', 'test_both_protocols': False}
    new = {**old, 'model': 'sasrec', 'tensorboard': 'tb', 'approximator': 'gru', 'sample_steps': 4,
           'precision': 'bf16', 'preset': 'published', 'loss': 'sampled', 'negatives': 64, 'inner_size': 64,
           'block': 'original', 'padding': 'right', 'init': 'normal', 'test_both_protocols': True}
    assert rundir.saved_config(str(tmp_path), {'config': new}) == new  # a saved value is never replaced
    (tmp_path / rundir.CONFIG).write_text(json.dumps(new))
    assert rundir.saved_config(str(tmp_path), {'model': {}}) == new  # a checkpoint without its config


def test_a_checkpoint_from_before_time_limit_loads_with_no_timing(tmp_path):
    import torch
    path = tmp_path / rundir.CHECKPOINT
    torch.save({'model': {}, 'epoch': 3}, path)
    assert rundir.load_checkpoint(str(path)) == {'model': {}, 'epoch': 3, 'timing': {}}
    torch.save({'model': {}, 'timing': {'step': 1.5}}, path)
    assert rundir.load_checkpoint(str(path))['timing'] == {'step': 1.5}


def test_saved_config_without_a_readable_config_is_one_line(tmp_path):
    (tmp_path / rundir.CONFIG).write_text('{not json')
    with pytest.raises(ValueError) as e:
        rundir.saved_config(str(tmp_path), {'model': {}})
    assert 'holds no config' in str(e.value) and '\n' not in str(e.value)


def test_progress_of_a_folder_new_unfinished_and_finished(tmp_path):
    assert rundir.progress(str(tmp_path))['status'] == 'new'
    (tmp_path / rundir.METRICS).write_text('epoch,loss,kept\n19,8.5,1\n39,7.9,\n')
    unfinished = rundir.progress(str(tmp_path))
    assert unfinished['status'] == 'unfinished' and unfinished['epoch'] == 40
    assert not rundir.finished(str(tmp_path))
    results = {'epochs_run': 60, 'epoch_seconds': [1.0] * 60, 'validations': [], 'smoke': True,
               'config': {'epochs': 500, 'eval_interval': 20}}
    (tmp_path / rundir.RESULTS).write_text(json.dumps(results))
    assert rundir.finished(str(tmp_path))
    assert rundir.progress(str(tmp_path))['status'] == 'unfinished'  # a smoke run's results do not count...
    done = rundir.progress(str(tmp_path), smoke_ok=True)  # ...unless smoke runs are asked for
    assert done['status'] == 'finished' and done['epoch'] == 60 and done['max_epochs'] == 500
