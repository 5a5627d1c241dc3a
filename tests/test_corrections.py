"""The switches that correct the reference's quirks, each shown to have its effect; --strict sets them all."""
import json
import os

import numpy as np
import pytest
import torch

import config
import main
import utils
from model import DiffuRec
from metrics import average_metrics, evaluate, metric_names
from rundir import load_checkpoint
from trainer import Trainer, kept_selection
from data import build_samples, make_synthetic

TINY = ['--dataset', 'synthetic', '--hidden_size', '16', '--num_blocks', '1', '--diffusion_steps', '8',
        '--max_len', '20', '--log_file', '']


def tiny_trainer(tmp_path, *flags):
    """A Trainer over a small synthetic dataset (60 users, 40 items) with diffusion_steps 8."""
    os.makedirs(tmp_path, exist_ok=True)
    cfg = config.resolve(TINY + ['--out_dir', str(tmp_path)] + list(flags))
    utils.set_seed(cfg.random_seed)
    samples = build_samples(make_synthetic(n_users=60, n_items=40), cfg.max_len)
    model = DiffuRec.from_config(cfg, 40)
    return Trainer(model, cfg, samples, str(tmp_path), torch.device('cpu'), utils.RunLog([], enabled=False))


def test_strict_sets_every_correction_and_the_defaults_are_the_reference():
    strict = config.resolve(['--strict'])
    reference = config.resolve([])
    expected_reference = dict(attention_mask='query', rank_padding=True, exclude_history=False,
                              metric_average='batch', select_metric=None, update_lossaware=False)
    expected_strict = dict(attention_mask='key', rank_padding=False, exclude_history=True, metric_average='user',
                           select_metric='NDCG@10', update_lossaware=True)
    assert set(config.STRICT) == set(expected_reference)
    for key, value in expected_strict.items():
        assert getattr(strict, key) == value, key
        assert getattr(reference, key) == expected_reference[key], key
        assert getattr(strict, key) != getattr(reference, key), key  # each one really is a change


def test_metric_average_user_is_the_exact_mean_over_users():
    # Two batches with ks = [1]: 4 users with 2 hits, then a last batch of 1 user with 1 hit.
    sums = torch.tensor([[2.0, 2.0], [1.0, 1.0]])
    counts = torch.tensor([4.0, 1.0])
    assert average_metrics(sums, counts, [1], 'user') == {'HR@1': 60.0, 'NDCG@1': 60.0}     # 3 hits / 5 users
    assert average_metrics(sums, counts, [1], 'batch') == {'HR@1': 75.0, 'NDCG@1': 75.0}    # (2/4 + 1/1) / 2
    # Equal batches: the two agree; an empty batch (a process's empty slice) changes neither.
    equal = torch.tensor([[1.0, 0.5], [3.0, 2.0], [0.0, 0.0]]), torch.tensor([4.0, 4.0, 0.0])
    assert average_metrics(*equal, [1], 'user') == average_metrics(*equal, [1], 'batch') == \
        {'HR@1': 50.0, 'NDCG@1': 31.25}
    with pytest.raises(ValueError, match='metric_average'):
        average_metrics(sums, counts, [1], 'median')


def small_eval_setup():
    torch.manual_seed(0)
    model = DiffuRec(30, hidden_size=16, num_blocks=1, diffusion_steps=8).eval()
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(1, 31, (10, 7), generator=g)
    inputs[:, :2] = 0  # left padding
    return model, inputs, torch.randint(1, 31, (10,), generator=g)


@pytest.mark.parametrize('exclude', [False, True])
def test_topk_collection_and_exclude_history(exclude):
    """evaluate(topk_items=...) collects each row's top-K of the very scores that were ranked; with
    histories no item of a row's history appears in it (without, some do: the check is not vacuous)."""
    model, inputs, labels = small_eval_setup()
    # each row's history: its input items and one more item the input window no longer shows
    histories = [[i for i in row if i] + [(r % 30) + 1] for r, row in enumerate(inputs.tolist())]
    excluded = histories if exclude else None
    torch.manual_seed(5)
    plain = evaluate(model, inputs, labels, [5, 20], 4, torch.device('cpu'), histories=excluded,
                     show_progress=False)
    collected = []
    torch.manual_seed(5)
    metrics = evaluate(model, inputs, labels, [5, 20], 4, torch.device('cpu'), histories=excluded,
                       show_progress=False, topk_items=collected)
    assert metrics == plain  # collecting changes nothing
    top = torch.cat(collected)
    torch.manual_seed(5)
    scores = torch.cat([model.scores(inputs[i:i + 4]) for i in range(0, 10, 4)])
    if exclude:
        for r, h in enumerate(histories):
            scores[r, h] = float('-inf')
    assert top.shape == (10, 20) and torch.equal(top, scores.topk(20, dim=1).indices)
    overlap = sum(len(set(top[r].tolist()) & set(histories[r])) for r in range(10))
    assert (overlap == 0) if exclude else (overlap > 0)


def test_select_metric_keeps_the_best_on_that_metric_alone(tmp_path):
    """Scripted validations: HR@5 peaks at epoch 3, NDCG@10 at epoch 2. The reference rule ('any') keeps
    epoch 3; --select_metric NDCG@10 keeps epoch 2 (its weights, too); both report per-metric maxima."""
    names = metric_names([5, 10, 20])
    script = {1: dict.fromkeys(names, 10.0), 2: dict(dict.fromkeys(names, 10.0), **{'NDCG@10': 30.0}),
              3: dict(dict.fromkeys(names, 10.0), **{'HR@5': 40.0, 'NDCG@10': 20.0})}
    for select, kept in ((None, 3), ('NDCG@10', 2)):
        trainer = tiny_trainer(tmp_path / str(select), *(['--select_metric', select] if select else []))
        for epoch in (1, 2, 3):
            trainer.evaluate_split = lambda split, stop=None, metrics=script[epoch]: metrics
            with torch.no_grad():
                trainer.module.item_table.weight.fill_(float(epoch))  # the weights say which epoch they are
            trainer.validate(epoch)
        assert trainer.kept_epoch == kept
        assert float(trainer.kept_state['item_table.weight'][0, 0]) == kept
        assert trainer.best == dict(dict.fromkeys(names, 10.0), **{'HR@5': 40.0, 'NDCG@10': 30.0})
        assert trainer.best_epoch['HR@5'] == 3 and trainer.best_epoch['NDCG@10'] == 2
        selection = kept_selection(trainer.history, trainer.kept_epoch, select, [5, 10, 20])
        assert selection == {'metric': select or 'any', 'epoch': kept, 'valid': script[kept]}
        if select:  # epoch 3 did not improve NDCG@10: one bad validation, although HR@5 improved
            assert trainer.bad_count == 1 and [r['kept'] for r in trainer.history] == [True, True, False]


def test_update_lossaware_feeds_the_sampler_and_makes_it_non_uniform(tmp_path):
    fed = tiny_trainer(tmp_path / 'fed', '--update_lossaware', '--limit_train_batches', '2')
    fed.train_epoch()
    sampler = fed.module.sampler
    assert sampler.warmed_up() and (sampler.loss_counts == sampler.history).all()
    p = sampler.weights() / sampler.weights().sum()
    assert p.max() / p.min() > 1.05  # the per-step losses differ, so do the weights
    torch.manual_seed(0)
    t, _ = sampler.sample(40_000, 'cpu')
    frequency = np.bincount(t.numpy(), minlength=8) / 40_000
    assert np.abs(frequency - p).max() < 0.01  # sampling follows the weights

    unfed = tiny_trainer(tmp_path / 'unfed', '--limit_train_batches', '2')  # the reference: never fed
    unfed.train_epoch()
    assert (unfed.module.sampler.loss_counts == 0).all()
    assert np.all(unfed.module.sampler.weights() == 1.0)


def test_strict_run_end_to_end(tmp_path):
    """A --strict run records every correction, feeds the sampler, and reports the kept model's metrics
    ('selection') beside the reference's per-metric maxima ('best_valid')."""
    out = str(tmp_path / 'run')
    assert main.main(TINY + ['--strict', '--epochs', '4', '--eval_interval', '1', '--limit_train_batches', '3',
                             '--out_dir', out]) == 0
    with open(os.path.join(out, 'results.json')) as f:
        res = json.load(f)
    for key, value in dict(attention_mask='key', rank_padding=False, exclude_history=True, metric_average='user',
                           select_metric='NDCG@10', update_lossaware=True).items():
        assert res['config'][key] == value
    rows = res['validations']
    assert [r['epoch'] for r in rows] == [1, 2, 3]
    best_row = max(rows, key=lambda r: r['NDCG@10'])  # max() returns the first of equal values
    assert res['selection']['metric'] == 'NDCG@10' and res['selection']['epoch'] == best_row['epoch']
    assert res['kept_epoch'] == best_row['epoch']
    assert res['selection']['valid'] == {m: best_row[m] for m in metric_names([5, 10, 20])}
    assert res['best_valid'] == {m: max(r[m] for r in rows) for m in metric_names([5, 10, 20])}
    sampler = load_checkpoint(os.path.join(out, 'checkpoint.pt'))['sampler']
    assert int(sampler['loss_counts'].sum()) > 0


def test_selection_step_is_the_reference_rule_written_out():
    """Kept when any metric beats its best (or --select_metric alone does); patience counts the validations
    in a row without a kept model."""
    from trainer import selection_step
    best = {'HR@10': 5.0, 'NDCG@10': 3.0}
    assert selection_step({'HR@10': 5.5, 'NDCG@10': 2.0}, best, None, 3, 5) == (['HR@10'], True, 0, False)
    assert selection_step({'HR@10': 5.5, 'NDCG@10': 2.0}, best, 'NDCG@10', 3, 5) == (['HR@10'], False, 4, False)
    assert selection_step({'HR@10': 5.0, 'NDCG@10': 3.0}, best, None, 4, 5) == ([], False, 5, True)  # ties do not improve
    assert selection_step({'HR@10': 0.0, 'NDCG@10': 0.0}, {}, 'NDCG@10', 0, 1) == (['HR@10', 'NDCG@10'], True, 0, False)
