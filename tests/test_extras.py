"""Beyond the reference: several seeds, recommendations, training curves and diversity of the top-K."""
import csv
import json
import os
import pickle
import statistics
import sys
import types

import pytest
import torch

import main
from aggregate import aggregate_results
from model import DiffuRec
from recommend import load_run, top_items, write_recommendations
from metrics import diversity_metrics
from utils import write_atomic
from data import DataError, load_item_categories, make_synthetic
from plots import plot_curves

FAST = ['--hidden_size', '16', '--num_blocks', '1', '--diffusion_steps', '8', '--max_len', '20', '--log_file', '',
        '--epochs', '2', '--eval_interval', '1', '--limit_train_batches', '2']


def read_json(path):
    with open(path) as f:
        return json.load(f)


def one_error_line(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), lines
    return lines[0]


# ----------------------------------------------------------------------------------------------------------
# A tiny dataset whose original ids differ from the new ones, a category file, and one trained run on it
# ----------------------------------------------------------------------------------------------------------

def original_item(i):
    return f'B{1000 + 7 * i}'


def original_user(u):
    return 5000 + 3 * u


@pytest.fixture(scope='module')
def mapped(tmp_path_factory):
    """(data_dir, dataset, run_dir): synthetic data (50 users, 60 items) with string item ids 'B1007'..
    and user ids 5000, 5003, .., trained for 2 epochs with a category file (category = new id mod 4)."""
    root = tmp_path_factory.mktemp('mapped')
    data = make_synthetic(n_users=50, n_items=60)
    data['smap'] = {original_item(i): i for i in range(1, 61)}
    data['umap'] = {original_user(u): u for u in range(50)}
    os.makedirs(root / 'data' / 'mapped')
    with open(root / 'data' / 'mapped' / 'dataset.pkl', 'wb') as f:
        pickle.dump(data, f)
    with open(root / 'categories.csv', 'w') as f:
        f.write('item,category\n' + ''.join(f'{original_item(i)},c{i % 4}\n' for i in range(1, 61)))
    run_dir = str(root / 'run')
    assert main.main(['--dataset', 'mapped', '--data_dir', str(root / 'data'), '--out_dir', run_dir,
                      '--category_file', str(root / 'categories.csv'), '--diversity_measure'] + FAST) == 0
    return root / 'data', data, run_dir


def read_recommendations(path):
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    by_user = {}
    for row in rows:
        by_user.setdefault(row['user'], []).append(row)
    return rows, by_user


@pytest.mark.parametrize('exclude', [True, False])
def test_recommendations_are_original_ids_topk_per_user(mapped, tmp_path, capsys, exclude):
    data_dir, data, run_dir = mapped
    out = str(tmp_path / 'recs.csv')

    def argv(path):
        return ['--recommend', run_dir, '--topk', '30', '--out', path] + (['--exclude_history'] if exclude else [])

    assert main.main(argv(out)) == 0
    assert 'recommendations written to' in capsys.readouterr().out
    rows, by_user = read_recommendations(out)
    assert list(rows[0]) == ['user', 'rank', 'item', 'score']
    assert list(by_user) == [str(original_user(u)) for u in range(50)]  # every user, ascending, original id
    items = set(data['smap'])
    overlap = 0
    for u in range(50):
        recs = by_user[str(original_user(u))]
        assert [int(r['rank']) for r in recs] == list(range(1, 31))
        assert all(r['item'] in items for r in recs) and len({r['item'] for r in recs}) == 30
        scores = [float(r['score']) for r in recs]
        assert scores == sorted(scores, reverse=True)
        history = {original_item(i) for i in data['train'][u] + data['val'][u] + data['test'][u]}
        overlap += len(history & {r['item'] for r in recs})
    assert (overlap == 0) if exclude else (overlap > 0)  # 30 of 60 items: without exclusion, some repeat
    # Seeded: the same command gives the same file.
    assert main.main(argv(out + '2')) == 0
    with open(out) as a, open(out + '2') as b:
        assert a.read() == b.read()


def test_a_user_with_fewer_than_k_items_left_gets_fewer_rows(tmp_path):
    torch.manual_seed(0)
    model = DiffuRec(12, hidden_size=8, num_blocks=1, diffusion_steps=4).eval()
    histories = [list(range(1, 10)), [3]]  # user 0 has seen 9 of the 12 items
    inputs = torch.tensor([[0] * (5 - len(h[-5:])) + h[-5:] for h in histories])  # left-padded, L = 5
    items, scores = top_items(model, inputs, histories, 5, 8, torch.device('cpu'), exclude_history=True)
    assert set(items[0, :3].tolist()) == {10, 11, 12} and torch.isinf(scores[0, 3:]).all()
    assert 3 not in items[1].tolist() and 0 not in items[1].tolist() and torch.isfinite(scores[1]).all()
    path = str(tmp_path / 'r.csv')
    write_recommendations(path, items, scores, {'u0': 0, 'u1': 1}, {f'i{i}': i for i in range(1, 13)})
    rows, by_user = read_recommendations(path)
    assert len(by_user['u0']) == 3 and len(by_user['u1']) == 5
    assert {r['item'] for r in by_user['u0']} == {'i10', 'i11', 'i12'}


def test_recommend_uses_the_kept_model(mapped, tmp_path):
    _, _, run_dir = mapped
    checkpoint = torch.load(os.path.join(run_dir, 'checkpoint.pt'), weights_only=True)
    kept = {k: v + 1.0 if v.is_floating_point() else v for k, v in checkpoint['model'].items()}
    for kept_model, expected in ((kept, kept), (None, checkpoint['model'])):
        copy_dir = tmp_path / ('kept' if kept_model else 'none')
        copy_dir.mkdir()
        write_atomic(str(copy_dir / 'checkpoint.pt'), lambda f: torch.save(dict(checkpoint, kept_model=kept_model), f),
                     binary=True)
        model, config, _ = load_run(str(copy_dir))
        assert config['dataset'] == 'mapped' and not model.training
        for name, value in model.state_dict().items():
            assert torch.equal(value, expected[name]), name


def test_recommend_errors_are_one_line(mapped, tmp_path, capsys):
    data_dir, data, run_dir = mapped
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'corrupt').mkdir()
    (tmp_path / 'corrupt' / 'checkpoint.pt').write_bytes(b'not a checkpoint')
    other = tmp_path / 'other'
    os.makedirs(other / 'mapped')
    changed = dict(data, train={u: list(reversed(s)) for u, s in data['train'].items()})
    with open(other / 'mapped' / 'dataset.pkl', 'wb') as f:
        pickle.dump(changed, f)
    for argv, message in (([str(tmp_path / 'missing')], 'no such run directory'),
                          ([str(tmp_path / 'empty')], 'no checkpoint'),
                          ([str(tmp_path / 'corrupt')], 'cannot be read'),
                          ([run_dir, '--data_dir', str(other)], 'differs from the data'),
                          ([run_dir, '--topk', '61'], 'topk'),
                          ([run_dir, '--seeds', '1', '2'], 'seeds')):
        assert main.main(['--recommend'] + argv) == 2
        assert message in one_error_line(capsys)


# ----------------------------------------------------------------------------------------------------------
# Curves
# ----------------------------------------------------------------------------------------------------------

def png_size(path):
    with open(path, 'rb') as f:
        head = f.read(24)
    assert head[:8] == b'\x89PNG\r\n\x1a\n'
    return int.from_bytes(head[16:20], 'big'), int.from_bytes(head[20:24], 'big')


def test_run_writes_training_curves(mapped):
    _, _, run_dir = mapped
    assert png_size(os.path.join(run_dir, 'curves.png')) == (1100, 400)
    with open(os.path.join(run_dir, 'log.txt')) as f:
        assert 'training curves written to' in f.read()


def test_curves_without_matplotlib_give_a_notice(tmp_path, monkeypatch):
    for name in ('matplotlib', 'matplotlib.figure', 'matplotlib.backends.backend_agg'):
        monkeypatch.setitem(sys.modules, name, None)  # `import` now raises ImportError
    history = [{'epoch': 1, 'HR@5': 1.0}]
    assert plot_curves(str(tmp_path / 'c.png'), [2.0, 1.0], history, ['HR@5']) is False
    lines = []
    trainer = types.SimpleNamespace(epoch_losses=[2.0, 1.0], history=history, kept_epoch=1)
    main.write_curves(str(tmp_path), trainer, [5], lines.append)
    assert lines == ['matplotlib is not installed: no curves.png (pip install matplotlib to get the training curves)']
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Diversity
# ----------------------------------------------------------------------------------------------------------

def test_diversity_metrics_by_hand():
    table = torch.tensor([[0.0, 0.0, 1.0],    # 0: padding
                          [1.0, 0.0, 0.0],    # 1
                          [2.0, 0.0, 0.0],    # 2: same direction as 1 (distance 0)
                          [0.0, 3.0, 0.0],    # 3: orthogonal to 1 (distance 1)
                          [-1.0, 0.0, 0.0]])  # 4: opposite to 1 (distance 2)
    categories = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    two = diversity_metrics(torch.tensor([[1, 2], [1, 3]]), table, 4, categories)
    # ild: (0 + 1) / 2; coverage: items 1, 2, 3 of 4; categories: {a} and {a, b, c}; shown a, b, c of 4.
    assert two == {'coverage@2': 75.0, 'ild@2': 0.5, 'categories@2': 2.0, 'category_coverage@2': 75.0}
    three = diversity_metrics(torch.tensor([[1, 3, 4], [0, 1, 2]]), table, 4)
    # pairs (1,3) 1, (1,4) 2, (3,4) 1 -> 4/3; (0,1) 1, (0,2) 1, (1,2) 0 -> 2/3; the padding row is no item.
    assert three == {'coverage@3': 100.0, 'ild@3': 1.0}
    assert diversity_metrics(torch.tensor([[0], [1]]), table, 4) == {'coverage@1': 25.0, 'ild@1': None}


def test_category_files_json_and_csv(tmp_path):
    smap = {'a1': 1, 'a2': 2, 'a3': 3}
    (tmp_path / 'c.json').write_text(json.dumps({'a1': 'toy', 'a2': ['toy', 'book'], 'zz': 'ignored'}))
    (tmp_path / 'c.csv').write_text('a1,toy\na2,toy\na2,book\nzz,ignored\n')
    from_json, names = load_item_categories(str(tmp_path / 'c.json'), smap)
    from_csv, names_csv = load_item_categories(str(tmp_path / 'c.csv'), smap)
    assert names == names_csv == ['book', 'toy']
    assert torch.equal(from_json, from_csv)
    assert from_json.tolist() == [[False, False], [False, True], [True, True], [False, False]]
    for name, text, message in (('none.csv', 'x,toy\n', 'none of its 1 entries'),
                                ('bad.csv', 'a1,toy,extra\n', 'fields'),
                                ('bad.json', '{"a1": ', 'not a readable'),
                                ('list.json', '[1, 2]', 'JSON object')):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message):
            load_item_categories(str(tmp_path / name), smap)
    with pytest.raises(DataError, match='cannot read'):
        load_item_categories(str(tmp_path / 'missing.csv'), smap)


def test_results_report_diversity(mapped):
    _, _, run_dir = mapped
    diversity = read_json(os.path.join(run_dir, 'results.json'))['diversity']
    assert set(diversity) == {'coverage@20', 'ild@20', 'categories@20', 'category_coverage@20'}
    assert 0 < diversity['coverage@20'] <= 100 and 0 < diversity['ild@20'] < 2
    assert 1 <= diversity['categories@20'] <= 4 and diversity['category_coverage@20'] == 100.0


def test_missing_category_file_is_one_line(tmp_path, capsys):
    assert main.main(['--dataset', 'synthetic', '--category_file', str(tmp_path / 'nope.json'),
                      '--out_dir', str(tmp_path / 'run')] + FAST) == 2
    assert 'nope.json' in one_error_line(capsys)


# ----------------------------------------------------------------------------------------------------------
# Several seeds
# ----------------------------------------------------------------------------------------------------------

def test_seeds_run_once_per_seed_and_aggregate(tmp_path, capsys):
    out = tmp_path / 'multi'
    assert main.main(['--dataset', 'synthetic', '--seeds', '3', '4', '--out_dir', str(out)] + FAST) == 0
    printed = capsys.readouterr().out
    runs = {s: read_json(out / f'seed_{s}' / 'results.json') for s in (3, 4)}
    assert [runs[s]['config']['random_seed'] for s in (3, 4)] == [3, 4]
    aggregate = read_json(out / 'aggregate.json')
    assert aggregate['seeds'] == [3, 4]
    assert set(aggregate['metrics']) == set(runs[3]['test']) | set(runs[3]['diversity'])
    for name, m in aggregate['metrics'].items():
        values = [runs[s]['test'].get(name, runs[s]['diversity'].get(name)) for s in (3, 4)]
        assert m['values'] == values
        assert m['mean'] == pytest.approx(statistics.mean(values), abs=1e-4)
        assert m['std'] == pytest.approx(statistics.stdev(values), abs=1e-4)
        assert f'{m["mean"]:10.4f} +- {m["std"]:.4f}' in printed
    assert any(m['std'] > 0 for m in aggregate['metrics'].values())  # the seeds really differ


def test_seeds_errors(tmp_path, capsys):
    assert main.main(['--dataset', 'synthetic', '--seeds', '3', '3', '--out_dir', str(tmp_path)] + FAST) == 2
    assert 'twice' in one_error_line(capsys)
    assert aggregate_results({7: {'dataset': 'd', 'test': {'HR@5': 2.0}, 'diversity': {'ild@1': None}}}) == \
        {'dataset': 'd', 'seeds': [7], 'std': 'sample standard deviation (n - 1)',
         'metrics': {'HR@5': {'mean': 2.0, 'std': None, 'values': [2.0]}}}
    both = {s: {'dataset': 'd', 'test': {'HR@5': v}, 'test_history_ranked': {'HR@5': v},
                'test_history_excluded': {'HR@5': v + 1}, 'diversity': {}} for s, v in ((1, 2.0), (2, 4.0))}
    assert {k: m['mean'] for k, m in aggregate_results(both)['metrics'].items()} == \
        {'HR@5': 3.0, 'history ranked HR@5': 3.0, 'history excluded HR@5': 4.0}


def test_recommend_samples_as_the_run_did_unless_told_otherwise(tmp_path, monkeypatch):
    """A run trained with --sample_steps 1 --precision bf16: --recommend samples with 1 step in bf16; an
    explicit --sample_steps 2 --precision fp32 wins."""
    run_dir = str(tmp_path / 'run')
    assert main.main(['--dataset', 'synthetic', '--hidden_size', '16', '--num_blocks', '1', '--diffusion_steps', '4',
                      '--epochs', '2', '--eval_interval', '1', '--limit_train_batches', '1', '--limit_eval_batches',
                      '1', '--sample_steps', '1', '--precision', 'bf16', '--log_file', '', '--out_dir', run_dir]) == 0
    seen = []
    sample, copy = DiffuRec.sample, DiffuRec.low_precision_copy
    monkeypatch.setattr(DiffuRec, 'sample', lambda self, seq, x_T=None, sample_steps=None: (
        seen.append(('steps', sample_steps)), sample(self, seq, x_T, sample_steps))[1])
    monkeypatch.setattr(DiffuRec, 'low_precision_copy', lambda self, dtype=torch.bfloat16: (
        seen.append(('copy', dtype)), copy(self, dtype))[1])
    out = str(tmp_path / 'recs.csv')
    assert main.main(['--recommend', run_dir, '--out', out]) == 0
    assert seen[0] == ('copy', torch.bfloat16) and set(seen[1:]) == {('steps', 1)}
    seen.clear()
    assert main.main(['--recommend', run_dir, '--out', out, '--sample_steps', '2', '--precision', 'fp32']) == 0
    assert seen and set(seen) == {('steps', 2)}
    assert main.main(['--recommend', run_dir, '--out', out, '--sample_steps', '5']) == 2  # the run's T is 4


# ----------------------------------------------------------------------------------------------------------
# --long_head: the group metrics of a hand-made dataset, worked out by hand
# ----------------------------------------------------------------------------------------------------------

# Full sequences (train + val + test) of ten users; the last two items are val and test. Lengths 3,3,3,4,5,5,6,7,7,8.
HAND_SEQUENCES = [
    [4, 1, 2],
    [4, 5, 7],
    [4, 9, 1],
    [4, 6, 2, 5],
    [4, 6, 7, 3, 4],
    [3, 6, 7, 10, 8],
    [3, 3, 1, 1, 11, 12],
    [3, 1, 2, 2, 5, 6, 1],
    [5, 8, 8, 9, 9, 12, 2],
    [10, 10, 11, 11, 12, 4, 4, 8],
]


def hand_scores(self, seq, sample_steps=None):
    """Scores over the 13 columns (padding 0 and items 1..12) that depend only on the last input item v:
    with offset d = (column - v - 1) mod 13, score = -d, except d = 2 scores -1 as d = 1 does (a tie).
    Rank of the label (1 + the other columns scoring >= it): d = 0 -> 1; d = 1 or 2 -> 3 (the tie counts
    against the label); d >= 3 -> d + 1."""
    offset = (torch.arange(13)[None] - seq[:, -1:].cpu() - 1) % 13
    scores = -offset.float()
    scores[offset == 2] = -1.0
    return scores.to(seq.device)


def test_long_head_groups_of_a_hand_made_dataset(tmp_path, monkeypatch):
    n = len(HAND_SEQUENCES)
    data = {'train': {u: s[:-2] for u, s in enumerate(HAND_SEQUENCES)},
            'val': {u: [s[-2]] for u, s in enumerate(HAND_SEQUENCES)},
            'test': {u: [s[-1]] for u, s in enumerate(HAND_SEQUENCES)},
            'umap': {700 + u: u for u in range(n)}, 'smap': {300 + i: i for i in range(1, 13)}}
    os.makedirs(tmp_path / 'data' / 'hand')
    with open(tmp_path / 'data' / 'hand' / 'dataset.pkl', 'wb') as f:
        pickle.dump(data, f)
    monkeypatch.setattr(DiffuRec, 'scores', hand_scores)
    assert main.main(['--dataset', 'hand', '--data_dir', str(tmp_path / 'data'), '--long_head',
                      '--hidden_size', '8', '--num_blocks', '1', '--heads', '1', '--diffusion_steps', '4',
                      '--max_len', '10', '--batch_size', '16', '--metric_ks', '1', '5', '--epochs', '1',
                      '--eval_interval', '5', '--log_file', '', '--out_dir', str(tmp_path / 'run')]) == 0
    groups = read_json(tmp_path / 'run' / 'results.json')['long_head']

    # Each user's sample is left-pad(f[:-1]) -> f[-1], so v = the val item and the label = the test item:
    #   user   v -> label   d = (label - v - 1) mod 13   rank   NDCG (rank <= 5): 1 / log2(rank + 1)
    #   0      1 -> 2       0                             1      1
    #   1      5 -> 7       1                             3      0.5          (tie with d = 2)
    #   2      9 -> 1       4                             5      1/log2(6) = 0.386853
    #   3      2 -> 5       2                             3      0.5          (tie with d = 1)
    #   4      3 -> 4       0                             1      1
    #   5     10 -> 8      10                            11      -
    #   6     11 -> 12      0                             1      1
    #   7      6 -> 1       7                             8      -
    #   8     12 -> 2       2                             3      0.5
    #   9      4 -> 8       3                             4      1/log2(5) = 0.430677
    # Item counts over all full sequences: 1:6 2:5 3:5 4:8 5:4 6:4 7:3 8:4 9:3 10:3 11:3 12:3; sorted
    # 3,3,3,3,3,4,4,4,5,5,6,8, whose 80th percentile is at position 0.8 * 11 = 8.8, between 5 and 5: 5.
    # Hot (count >= 5, so the items at exactly 5 are hot): labels 1, 2, 3, 4 -> users 0, 2, 4, 7, 8.
    # Lengths 3,3,3,4,5,5,6,7,7,8: percentiles 20/40/60/80 at positions 1.8, 3.6, 5.4, 7.2 ->
    # 3, 4 + 0.6 = 4.6, 5 + 0.4 = 5.4, 7. short: len <= 3 (users 0-2); mid_short: <= 4.6 (user 3);
    # mid: <= 5.4 (users 4, 5); mid_long: <= 7 (users 6-8); long: user 9.
    # One batch per group (batch 16), so the batch mean is the user mean; percent, 4 decimals.
    expected = {
        # ranks 1, 5, 1, 8, 3: HR@1 2/5, HR@5 4/5, NDCG@5 (1 + 0.386853 + 1 + 0.5) / 5 = 0.577371
        'hot': {'HR@1': 40.0, 'HR@5': 80.0, 'NDCG@1': 40.0, 'NDCG@5': 57.7371, 'users': 5},
        # ranks 3, 3, 11, 1, 4: HR@1 1/5, HR@5 4/5, NDCG@5 (0.5 + 0.5 + 1 + 0.430677) / 5 = 0.486135
        'cold': {'HR@1': 20.0, 'HR@5': 80.0, 'NDCG@1': 20.0, 'NDCG@5': 48.6135, 'users': 5},
        # ranks 1, 3, 5: HR@1 1/3, HR@5 3/3, NDCG@5 (1 + 0.5 + 0.386853) / 3 = 0.628951
        'short': {'HR@1': 33.3333, 'HR@5': 100.0, 'NDCG@1': 33.3333, 'NDCG@5': 62.8951, 'users': 3},
        # rank 3
        'mid_short': {'HR@1': 0.0, 'HR@5': 100.0, 'NDCG@1': 0.0, 'NDCG@5': 50.0, 'users': 1},
        # ranks 1, 11
        'mid': {'HR@1': 50.0, 'HR@5': 50.0, 'NDCG@1': 50.0, 'NDCG@5': 50.0, 'users': 2},
        # ranks 1, 8, 3: NDCG@5 (1 + 0.5) / 3 = 0.5
        'mid_long': {'HR@1': 33.3333, 'HR@5': 66.6667, 'NDCG@1': 33.3333, 'NDCG@5': 50.0, 'users': 3},
        # rank 4: NDCG@5 0.430677
        'long': {'HR@1': 0.0, 'HR@5': 100.0, 'NDCG@1': 0.0, 'NDCG@5': 43.0677, 'users': 1},
    }
    assert list(groups) == list(expected)
    for name, values in expected.items():
        assert groups[name] == values, name
