"""The SASRec baseline (--model sasrec): its samples, its causal attention and loss, and the shared harness."""
import json
import os

import pytest
import torch

import main
from model import DiffuRec
from data import build_samples, make_synthetic, sequence_samples
from metrics import evaluate, label_ranks, rank_metrics
from sasrec import SASRec

TINY = dict(hidden_size=16, num_blocks=2, heads=2, dropout=0.2, emb_dropout=0.2, max_len=12)


def tiny_sasrec(n_items=30, seed=0):
    torch.manual_seed(seed)
    return SASRec(n_items, **TINY)


def test_samples_are_shifted_training_sequences_without_val_or_test_items():
    # items 1..3 appear only as validation or test items; train uses 4..9
    data = {'train': {0: [4, 5, 6, 7], 1: [8], 2: [9, 4]}, 'val': {0: [1], 1: [2], 2: [3]},
            'test': {0: [2], 1: [3], 2: [1]}, 'umap': {}, 'smap': {}}
    inputs, targets = sequence_samples(data, max_len=3)
    # user 1 has a single training item, hence nothing to predict: no row
    assert inputs.tolist() == [[4, 5, 6], [0, 0, 9]]
    assert targets.tolist() == [[5, 6, 7], [0, 0, 4]]
    assert not set(targets.flatten().tolist()) & {1, 2, 3}
    assert not set(inputs.flatten().tolist()) & {1, 2, 3}


def test_causal_mask_later_items_never_change_earlier_positions():
    model = tiny_sasrec().eval()
    seq = torch.tensor([[0, 0, 0, 3, 7, 9, 2, 5, 8, 1, 4, 6]])
    changed = seq.clone()
    changed[0, 8:] = torch.tensor([11, 12, 13, 14])
    with torch.no_grad():
        before, after = model.hidden(seq), model.hidden(changed)
    torch.testing.assert_close(before[0, :8], after[0, :8], rtol=0, atol=0)
    assert not torch.allclose(before[0, 8:], after[0, 8:])


def test_padding_positions_never_reach_the_loss():
    model = tiny_sasrec().train()
    seq = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 3, 7, 9, 2, 5], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 6]])
    targets = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 7, 9, 2, 5, 8], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6, 1]])
    captured = {}
    real_hidden = model.hidden

    def hidden(s, last_only=False):
        h = real_hidden(s, last_only)
        h.retain_grad()
        captured['h'] = h
        return h

    model.hidden = hidden
    rows_into_product = []
    real_logits = model.logits
    model.logits = lambda h: rows_into_product.append(h.shape[0]) or real_logits(h)
    mean, per_row, _ = model(seq, targets)
    mean.backward()
    grad = captured['h'].grad  # (B, L, d)
    padding = targets == 0
    assert torch.count_nonzero(grad[padding]) == 0
    assert torch.count_nonzero(grad[~padding]) > 0
    assert rows_into_product == [int((~padding).sum())]  # 7 real positions, no padding row in the product
    assert per_row.shape == (2,) and torch.isclose(per_row.sum() / 7, mean)


def test_sampled_loss_is_the_softmax_over_the_target_and_uniform_negatives():
    """--loss sampled: the cross-entropy of the target (column 0) against `negatives` items drawn uniformly from
    the real items after the forward pass, scored by the same product as the full softmax's columns."""
    n_items, negatives = 30, 7
    torch.manual_seed(0)
    model = SASRec(n_items, **TINY, loss='sampled', negatives=negatives).eval()  # no dropout draws
    seq = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 3, 7, 9, 2, 5], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 6]])
    targets = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 7, 9, 2, 5, 8], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6, 1]])
    torch.manual_seed(5)
    mean, per_row, _ = model(seq, targets)
    torch.manual_seed(5)
    real = targets > 0
    with torch.no_grad():
        full = model.logits(model.hidden(seq)[real])  # (7, n_items + 1)
    drawn = torch.randint(1, n_items + 1, (7, negatives))
    columns = torch.cat([targets[real][:, None], drawn], dim=1)
    expected = torch.nn.functional.cross_entropy(full.gather(1, columns), torch.zeros(7, dtype=torch.long),
                                                 reduction='none')
    torch.testing.assert_close(mean.detach(), expected.mean())
    torch.testing.assert_close(per_row.detach(), torch.stack([expected[:5].sum(), expected[5:].sum()]))
    draws = model.draw_negatives(4000, torch.device('cpu'))
    assert draws.shape == (4000, negatives) and draws.min() == 1 and draws.max() == n_items
    counts = torch.bincount(draws.flatten(), minlength=n_items + 1)[1:].float()
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()  # uniform, padding never


def original_block_by_hand(model, seq, mask_padding_keys=False, right_padded=False):
    """SASRec's original block written out plainly (eval mode): q = LN1(x), a = q + MHA(q; x, x) under a causal
    mask alone (or also masking padding keys), y = LN2(a), out = y + W2 relu(W1 y), padding positions zeroed
    after every block; then LN. The positions end with the last row of the table, or with right_padded (seq
    padded on the right, as Klenitskiy & Vasilev's code does) start with its first."""
    F = torch.nn.functional
    L = seq.shape[1]
    keep = (seq > 0).unsqueeze(-1).float()
    positions = model.position_table.weight[:L] if right_padded else model.position_table.weight[-L:]
    x = (model.item_table(seq) * model.item_table.embedding_dim ** 0.5 + positions) * keep
    padding_keys = (mask_padding_keys & (seq == 0))[:, None, None, :] & ~torch.eye(L, dtype=torch.bool)  # no empty row
    blocked = torch.ones(L, L, dtype=torch.bool).triu(1) | padding_keys
    for block in model.blocks:
        attn, heads = block.attn, block.attn.heads
        q = block.ln_attn(x)
        split = lambda t: t.view(t.shape[0], L, heads, -1).transpose(1, 2)  # noqa: E731
        Q, K, V = split(attn.q(q)), split(attn.k(x)), split(attn.v(x))
        weights = (Q @ K.transpose(-2, -1) / Q.shape[-1] ** 0.5).masked_fill(blocked, float('-inf')).softmax(-1)
        a = q + attn.out((weights @ V).transpose(1, 2).reshape(x.shape))
        y = block.ln_ffn(a)
        x = (y + block.w2(F.relu(block.w1(y)))) * keep
    return model.out_ln(x)


def test_original_block_is_the_sasrec_code_block_and_keeps_causality():
    torch.manual_seed(0)
    model = SASRec(30, **TINY, block='original', inner_size=16).eval()
    assert [b.w1.out_features for b in model.blocks] == [16, 16]
    seq = torch.tensor([[0, 0, 0, 3, 7, 9, 2, 5, 8, 1, 4, 6], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 6]])
    with torch.no_grad():
        expected = original_block_by_hand(model, seq)
        torch.testing.assert_close(model.hidden(seq), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.hidden(seq, last_only=True)[:, -1], expected[:, -1], rtol=1e-5, atol=1e-5)
        changed = seq.clone()
        changed[0, 8:] = torch.tensor([11, 12, 13, 14])
        torch.testing.assert_close(model.hidden(changed)[0, :8], model.hidden(seq)[0, :8], rtol=0, atol=0)
        # the padding keys are zero vectors, yet not masked: they still shift the real positions' attention
        masked = original_block_by_hand(model, seq, mask_padding_keys=True)
        assert torch.isfinite(masked).all() and not torch.allclose(expected[1, -2:], masked[1, -2:], atol=1e-3)
        fast = model.low_precision_copy().hidden(seq, last_only=True)[:, -1]  # the blocks in bf16
        assert fast.dtype == torch.bfloat16
        torch.testing.assert_close(fast.float(), expected[:, -1], rtol=0.05, atol=0.05)
    model.train()
    mean, _, _ = model(seq, torch.roll(seq, -1, dims=1) * (seq > 0))
    mean.backward()
    assert all(p.grad is not None for p in model.blocks.parameters())
    with pytest.raises(ValueError, match="unknown block 'post'"):
        SASRec(30, **TINY, block='post')


def test_padding_right_is_what_right_padded_sequences_give():
    histories = [[3, 7, 9, 2, 5, 8, 1, 4, 6], [4, 6], [11, 2, 2, 9, 5]]
    L = TINY['max_len']
    left = torch.tensor([[0] * (L - len(h)) + h for h in histories])
    right = torch.tensor([h + [0] * (L - len(h)) for h in histories])
    torch.manual_seed(0)
    model = SASRec(30, **TINY, block='original', inner_size=16, padding='right').eval()
    with torch.no_grad():
        expected = original_block_by_hand(model, right, right_padded=True)
        got = model.hidden(left)
        for row, h in enumerate(histories):
            torch.testing.assert_close(got[row, L - len(h):], expected[row, :len(h)], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.hidden(left, last_only=True)[:, -1], got[:, -1], rtol=1e-5, atol=1e-5)
    # Both blocks: a new item leaves the hidden states of the items before it as they were with 'right' (their
    # positions stay), and moves every one of them with 'left' (each moves one position back).
    longer = torch.tensor([[0] * (L - 10) + histories[0] + [10]])
    for block in SASRec.block_kinds:
        for padding, same in (('right', True), ('left', False)):
            torch.manual_seed(0)
            model = SASRec(30, **TINY, block=block, padding=padding).eval()
            with torch.no_grad():
                before, after = model.hidden(left[:1])[0, -9:], model.hidden(longer)[0, -10:-1]
            assert torch.allclose(before, after, atol=1e-5) == same, (block, padding)
    model.train()
    mean, _, _ = model(left, torch.roll(left, -1, dims=1) * (left > 0))
    mean.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="unknown padding 'middle'"):
        SASRec(30, **TINY, padding='middle')


def test_init_normal_draws_every_weight_from_n_0_002():
    torch.manual_seed(0)
    model = SASRec(3000, hidden_size=64, num_blocks=2, heads=1, max_len=200, init='normal')
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    assert len(weights) == 2 + 2 * 6  # the two tables; q, k, v, out, w1, w2 of each block
    for w in weights:
        assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002, w.shape
    assert model.item_table.weight[0].abs().max() == 0  # the padding row starts at zero
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(b.abs().max() == 0 for b in biases)
    default = SASRec(3000, hidden_size=64, num_blocks=2, heads=1, max_len=200)  # xavier: std sqrt(2 / (n + d))
    assert abs(default.item_table.weight.std().item() - (2 / (3001 + 64)) ** 0.5) < 0.002
    assert abs(default.blocks[0].w1.weight.std().item() - (2 / (64 + 256)) ** 0.5) < 0.005
    with pytest.raises(ValueError, match="unknown init 'uniform'"):
        SASRec(30, **TINY, init='uniform')


def test_both_models_go_through_the_same_evaluation():
    data = make_synthetic(n_users=40, n_items=30)
    inputs, labels = build_samples(data, TINY['max_len'])['test']
    ks = [5, 10]
    for model in (tiny_sasrec(), DiffuRec(30, hidden_size=16, num_blocks=1, heads=2, diffusion_steps=4)):
        calls = []
        real_scores = model.scores
        model.scores = lambda seq, **kw: calls.append(len(seq)) or real_scores(seq, **kw)
        torch.manual_seed(3)
        got = evaluate(model, inputs, labels, ks, 16, torch.device('cpu'), metric_average='user',
                       show_progress=False)
        assert calls == [16, 16, 8]
        torch.manual_seed(3)
        model.eval()
        scores = torch.cat([real_scores(inputs[i:i + 16]) for i in range(0, 40, 16)])
        expected = rank_metrics(label_ranks(scores.float(), labels), ks).mean(0) * 100
        assert list(got.values()) == pytest.approx(expected.tolist(), abs=1e-4)


FAST = ['--dataset', 'synthetic', '--model', 'sasrec', '--log_file', '', '--max_len', '20']


def test_sasrec_learns_synthetic_well_above_chance(tmp_path):
    out = tmp_path / 'run'
    assert main.main(FAST + ['--epochs', '8', '--eval_interval', '4', '--out_dir', str(out)]) == 0
    with open(out / 'results.json') as f:
        results = json.load(f)
    assert results['model'] == 'sasrec' and results['config']['hidden_size'] == 64
    chance = 100 * 10 / 200
    assert results['test']['HR@10'] > 5 * chance, results['test']


def test_sasrec_learns_synthetic_with_the_sampled_loss(tmp_path):
    out = tmp_path / 'run'
    assert main.main(FAST + ['--loss', 'sampled', '--negatives', '20', '--epochs', '8', '--eval_interval', '4',
                             '--out_dir', str(out)]) == 0
    with open(out / 'results.json') as f:
        results = json.load(f)
    assert (results['config']['loss'], results['config']['negatives']) == ('sampled', 20)
    assert results['test']['HR@10'] > 5 * 100 * 10 / 200, results['test']


def test_inner_size_sets_the_feed_forward_width_and_travels_with_the_run(tmp_path, capsys):
    assert [b.w1.out_features for b in tiny_sasrec().blocks] == [4 * TINY['hidden_size']] * 2  # the default
    narrow = SASRec(30, **TINY, inner_size=16)
    assert [(b.w1.weight.shape, b.w2.weight.shape) for b in narrow.blocks] == [((16, 16), (16, 16))] * 2
    out = str(tmp_path / 'run')
    assert main.main(FAST + ['--inner_size', '24', '--epochs', '2', '--eval_interval', '1',
                             '--limit_train_batches', '1', '--out_dir', out]) == 0
    with open(os.path.join(out, 'results.json')) as f:
        assert json.load(f)['config']['inner_size'] == 24
    # the run's model is rebuilt at its own width: a 4 d model would not load this checkpoint
    assert main.main(['--recommend', out, '--topk', '3', '--log_file', '']) == 0
    capsys.readouterr()
    assert main.main(['--dataset', 'synthetic', '--inner_size', '24', '--log_file', '']) == 2
    assert '--inner_size configures SASRec and does not apply to --model diffurec' in one_error_line(capsys)


def test_original_block_trains_and_travels_with_the_run(tmp_path, capsys):
    out = str(tmp_path / 'run')
    assert main.main(FAST + ['--block', 'original', '--epochs', '8', '--eval_interval', '4', '--out_dir', out]) == 0
    with open(os.path.join(out, 'results.json')) as f:
        results = json.load(f)
    assert results['config']['block'] == 'original'
    assert results['test']['HR@10'] > 5 * 100 * 10 / 200, results['test']
    capsys.readouterr()
    assert main.main(['--dataset', 'synthetic', '--block', 'original', '--log_file', '']) == 2
    assert '--block configures SASRec and does not apply to --model diffurec' in one_error_line(capsys)


def test_padding_and_init_travel_with_the_run(tmp_path, capsys):
    out = str(tmp_path / 'run')
    assert main.main(FAST + ['--padding', 'right', '--init', 'normal', '--epochs', '2', '--eval_interval', '1',
                             '--limit_train_batches', '1', '--out_dir', out]) == 0
    with open(os.path.join(out, 'results.json')) as f:
        config = json.load(f)['config']
    assert (config['padding'], config['init']) == ('right', 'normal')
    assert main.main(['--recommend', out, '--topk', '3', '--log_file', '']) == 0
    capsys.readouterr()
    for flag, value in (('--padding', 'right'), ('--init', 'normal')):
        assert main.main(['--dataset', 'synthetic', flag, value, '--log_file', '']) == 2
        assert f'{flag} configures SASRec and does not apply to --model diffurec' in one_error_line(capsys)


def one_error_line(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), lines
    return lines[0]


def test_a_checkpoint_of_one_model_is_refused_by_the_other(tmp_path, capsys):
    out = str(tmp_path / 'run')
    assert main.main(FAST + ['--epochs', '2', '--eval_interval', '1', '--limit_train_batches', '1',
                             '--out_dir', out]) == 0
    capsys.readouterr()
    assert main.main(['--resume', out, '--model', 'diffurec']) == 2
    line = one_error_line(capsys)
    assert "model='sasrec'" in line and "'diffurec'" in line
    # --recommend rebuilds the run's own model from its checkpoint
    assert main.main(['--recommend', out, '--topk', '3', '--log_file', '']) == 0
    assert os.path.getsize(os.path.join(out, 'recommendations.csv')) > 0


@pytest.mark.parametrize('flag', [['--diffusion_steps', '8'], ['--sample_steps', '2'], ['--attention_mask', 'key'],
                                  ['--update_lossaware']])
def test_diffusion_flags_are_refused_with_sasrec(flag, capsys):
    assert main.main(FAST + flag) == 2
    assert flag[0] in one_error_line(capsys)


@pytest.mark.parametrize('argv, message', [
    (['--dataset', 'synthetic', '--loss', 'sampled'], '--loss configures SASRec and does not apply to --model diffurec'),
    (FAST + ['--negatives', '8'], '--negatives applies to --loss sampled only (the loss is full)'),
])
def test_sampled_loss_flags_out_of_place_are_one_line(argv, message, capsys):
    assert main.main(argv + ['--log_file', '']) == 2
    assert message in one_error_line(capsys)


def test_every_registered_model_keeps_the_interface_and_names_real_flags():
    """The registry is what --model offers; each class carries the interface's parts, and its preset and own
    flags name flags of main.py's parser (a misspelt one would silently preset or refuse nothing)."""
    import config
    from model import MODELS, Recommender, foreign_flags
    parser = config.build_parser()
    flags = {a.dest for a in parser._actions}
    assert set(MODELS) == set(next(a.choices for a in parser._actions if a.dest == 'model'))
    methods = [name for name in vars(Recommender) if not name.startswith('_')]
    for name, cls in MODELS.items():
        assert cls.name == name
        assert all(hasattr(cls, part) for part in methods + ['name', 'title', 'preset', 'own_flags']), name
        assert set(cls.preset) <= flags and set(cls.own_flags) <= flags, name
        assert all(set(p) <= flags for p in getattr(cls, 'published_presets', {}).values()), name
        assert not set(cls.own_flags) & set(foreign_flags(name)), name  # a flag has one owner
    assert foreign_flags('sasrec')['diffusion_steps'] is MODELS['diffurec']


def test_published_presets_set_the_flags_not_given_for_their_dataset():
    """--preset published takes the dataset's published configuration over SASRec's preset; a flag given
    wins; a dataset without one, or another --model, is a one-line error; the default changes nothing."""
    import config
    sasrec = ['--model', 'sasrec', '--preset', 'published']
    for dataset, published in SASRec.published_presets.items():
        cfg = vars(config.resolve(sasrec + ['--dataset', dataset]))
        assert {k: cfg[k] for k in published} == published, dataset
        general = {k: v for k, v in SASRec.preset.items() if k not in published}
        assert {k: cfg[k] for k in general} == general, dataset
        assert cfg['preset'] == 'published'
    ml = config.resolve(sasrec + ['--dataset', 'ml-1m'])
    assert (ml.max_len, ml.num_blocks, ml.dropout, ml.epochs, ml.eval_interval, ml.patience, ml.select_metric) == \
        (200, 2, 0.1, 100, 1, 10, 'NDCG@10')
    assert ml.exclude_history
    beauty = config.resolve(sasrec + ['--dataset', 'amazon_beauty', '--patience', '7', '--num_blocks', '3'])
    assert (beauty.patience, beauty.num_blocks, beauty.eval_interval) == (7, 3, 1)
    assert (beauty.exclude_history, beauty.select_metric, beauty.dropout) == (True, 'HR@10', 0.2)
    ranked = config.resolve(sasrec + ['--dataset', 'toys', '--no-exclude_history'])
    assert (ranked.exclude_history, ranked.select_metric) == (False, 'HR@10')
    default = config.resolve(['--model', 'sasrec', '--dataset', 'amazon_beauty'])
    assert (default.preset, default.num_blocks, default.eval_interval, default.patience) == ('default', 2, 2, 5)
    assert (default.exclude_history, default.select_metric) == (False, None)
    with pytest.raises(ValueError, match='no published SASRec configuration for --dataset steam'):
        config.resolve(sasrec + ['--dataset', 'steam'])
    with pytest.raises(ValueError, match='--preset configures SASRec and does not apply to --model diffurec'):
        config.resolve(['--dataset', 'toys', '--preset', 'published'])


def test_both_protocols_test_the_kept_model_with_and_without_history(tmp_path):
    """--test_both_protocols: one run gives the test row of the other --exclude_history setting too. Two runs
    that differ only in --exclude_history train alike and keep the same epoch (one validation), so each one's
    second row is the other's first."""
    runs = {}
    for exclude in (False, True):
        out = str(tmp_path / f'exclude_{exclude}')
        assert main.main(['--model', 'sasrec', '--dataset', 'synthetic', '--epochs', '3', '--eval_interval', '2',
                          '--test_both_protocols', '--out_dir', out, '--log_file', '']
                         + ['--exclude_history'] * exclude) == 0
        with open(os.path.join(out, 'results.json')) as f:
            runs[exclude] = json.load(f)
    plain, excluding = runs[False], runs[True]
    assert plain['epoch_losses'] == excluding['epoch_losses'] and plain['kept_epoch'] == excluding['kept_epoch'] == 2
    assert plain['test_history_ranked'] == plain['test'] == excluding['test_history_ranked']
    assert excluding['test_history_excluded'] == excluding['test'] == plain['test_history_excluded']
    assert plain['test_history_excluded'] != plain['test']  # synthetic histories hold high-scoring items
