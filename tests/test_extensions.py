"""Beyond the reference: fast sampling (respaced reverse process), rounding, approximator ablations, lambda = 0."""
import json
import os

import numpy as np
import pytest
import torch

import main
from diffurec import (GaussianDiffusion, GRUApproximator, LinearApproximator, RespacedDiffusion,
                      get_named_beta_schedule, respaced_timesteps, timestep_embedding)
from model import DiffuRec
from test_model import batch, small_model, under_seed

TINY = ['--dataset', 'synthetic', '--hidden_size', '32', '--num_blocks', '1', '--epochs', '2', '--eval_interval', '1',
        '--limit_train_batches', '2', '--limit_eval_batches', '1', '--batch_size', '64', '--max_len', '10',
        '--diffusion_steps', '8', '--log_file', '']


def read_results(run_dir):
    with open(os.path.join(run_dir, 'results.json')) as f:
        return json.load(f)


def record_approximator_calls(model):
    """Forward hook: the list of t_scaled (B,) the approximator is called with, one entry per call."""
    calls = []
    model.approximator.register_forward_hook(lambda module, args, out: calls.append(args[2].clone()))
    return calls


# ----------------------------------------------------------------------------------------------------------
# Fast sampling
# ----------------------------------------------------------------------------------------------------------

def test_respaced_timesteps_are_evenly_spaced_and_keep_both_ends():
    assert respaced_timesteps(8, 8) == list(range(8))
    assert respaced_timesteps(8, 4) == [0, 2, 5, 7]
    assert respaced_timesteps(8, 2) == [0, 7]
    assert respaced_timesteps(8, 1) == [7]
    assert respaced_timesteps(32, 4) == [0, 10, 21, 31]
    for k in range(2, 33):
        kept = respaced_timesteps(32, k)
        gaps = np.diff(kept)
        assert len(kept) == k and kept[0] == 0 and kept[-1] == 31
        assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1
    for bad in (0, 9):
        with pytest.raises(ValueError, match='sample_steps'):
            respaced_timesteps(8, bad)


def test_respaced_diffusion_keeps_the_marginals_of_the_kept_steps():
    base = GaussianDiffusion(get_named_beta_schedule('trunc_lin', 32))
    assert base.respaced(32) is base
    fast = base.respaced(4)
    kept = [0, 10, 21, 31]
    abar = base.consts64['alphas_cumprod']
    assert isinstance(fast, RespacedDiffusion) and fast.num_timesteps == 4
    np.testing.assert_allclose(fast.consts64['alphas_cumprod'], abar[kept], rtol=1e-12)
    np.testing.assert_allclose(fast.consts64['betas'], 1 - abar[kept] / np.append(1.0, abar[kept][:-1]), rtol=1e-12)
    # The approximator sees the original timesteps, scaled as in training (1000 / 32), not the indices 0..3.
    torch.testing.assert_close(fast.scale_timesteps(torch.arange(4)), torch.tensor(kept) * (1000 / 32))
    torch.testing.assert_close(base.scale_timesteps(torch.tensor(kept)), fast.scale_timesteps(torch.arange(4)))


def test_all_steps_is_exactly_the_reference_path():
    model = small_model().eval()  # T = 8
    seq, _ = batch()
    torch.manual_seed(7)
    reference = model.scores(seq)
    torch.manual_seed(7)
    assert torch.equal(model.scores(seq, sample_steps=8), reference)
    torch.manual_seed(7)
    assert not torch.equal(model.scores(seq, sample_steps=4), reference)


@pytest.mark.parametrize('steps', [1, 2, 4, 8])
def test_fewer_steps_call_the_approximator_fewer_times_at_the_original_timesteps(steps):
    model = small_model().eval()
    calls = record_approximator_calls(model)
    seq, _ = batch()
    model.scores(seq, sample_steps=steps)
    assert len(calls) == steps
    expected = [t * 1000 / 8 for t in reversed(respaced_timesteps(8, steps))]
    assert [c[0].item() for c in calls] == pytest.approx(expected)


def test_one_step_returns_the_approximators_guess_from_pure_noise():
    model = small_model().eval()
    outputs = []
    model.approximator.register_forward_hook(lambda module, args, out: outputs.append(out.clone()))
    seq, _ = batch()
    x0 = model.sample(seq, x_T=torch.randn(len(seq), 16), sample_steps=1)
    assert len(outputs) == 1
    torch.testing.assert_close(x0, outputs[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('flags, expected', [(['--sample_steps', '3'], [3, 3]),
                                             (['--sample_steps', '2', '--eval_sample_steps', '1'], [1, 2]),
                                             ([], [None, None])])
def test_sample_steps_reach_validation_and_test(tmp_path, monkeypatch, flags, expected):
    """One validation batch (epoch 1), then one test batch: each scored with its own number of steps."""
    seen = []
    scores = DiffuRec.scores

    def recording_scores(self, seq, sample_steps=None):
        seen.append(sample_steps)
        return scores(self, seq, sample_steps=sample_steps)

    monkeypatch.setattr(DiffuRec, 'scores', recording_scores)
    out = str(tmp_path / 'run')
    assert main.main(TINY + flags + ['--out_dir', out]) == 0
    assert seen == expected
    assert read_results(out)['config']['sample_steps'] == expected[1]


@pytest.mark.parametrize('flags', [['--sample_steps', '0'], ['--sample_steps', '9'], ['--eval_sample_steps', '9'],
                                   ['--sample_steps', '33', '--diffusion_steps', '32']])
def test_sample_steps_out_of_range_is_one_clear_line(tmp_path, capsys, flags):
    assert main.main(TINY + flags + ['--out_dir', str(tmp_path / 'run')]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: --') and 'sample_steps must lie in [1, ' in lines[0]


# ----------------------------------------------------------------------------------------------------------
# Rounding
# ----------------------------------------------------------------------------------------------------------

def test_routing_scores_are_minus_the_clamped_squared_distance():
    inner, routing = small_model().eval(), small_model(rounding='routing').eval()  # the same weights
    seq, _ = batch()
    table = inner.item_table.weight
    x0, s_inner, s_routing = (under_seed(7, fn, seq) for fn in (inner.sample, inner.scores, routing.scores))
    torch.testing.assert_close(s_inner, x0 @ table.t())
    torch.testing.assert_close(s_routing, -((x0[:, None] - table[None]) ** 2).sum(-1).clamp(min=0),
                               atol=1e-4, rtol=1e-5)
    assert (s_routing <= 0).all()
    # Routing ranks by x0 . e - |e|^2 / 2: the item norms change the order, so the top items differ.
    assert torch.equal(s_routing.argmax(1), (s_inner - 0.5 * (table ** 2).sum(-1)).argmax(1))
    assert not torch.equal(s_routing.argmax(1), s_inner.argmax(1))


@pytest.mark.parametrize('rounding', ['inner', 'routing'])
def test_padding_column_is_minus_infinity_without_rank_padding(rounding):
    seq, _ = batch()
    scores = small_model(rounding=rounding, rank_padding=False).eval().scores(seq)
    assert torch.isneginf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()


# ----------------------------------------------------------------------------------------------------------
# Approximator ablations
# ----------------------------------------------------------------------------------------------------------

def count(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_ablation_parameter_counts():
    d = 16
    time_mlp = (d * 4 * d + 4 * d) + (4 * d * d + d)
    gru = small_model(approximator='gru')  # num_blocks (2) and heads do not apply: one GRU layer
    mlp = small_model(approximator='mlp')
    assert isinstance(gru.approximator, GRUApproximator) and isinstance(mlp.approximator, LinearApproximator)
    assert count(gru.approximator) == time_mlp + 3 * (2 * d * d + 2 * d) + 2 * d == 3792  # GRU gates, LayerNorm
    assert count(mlp.approximator) == time_mlp + d * d + d == 2400
    table_and_ln = 31 * d + 2 * d
    assert count(gru) == table_and_ln + 3792 and count(mlp) == table_and_ln + 2400


@pytest.mark.parametrize('kind', ['gru', 'mlp'])
def test_ablations_read_the_noisy_input_at_the_last_position(kind):
    model = small_model(approximator=kind).eval()
    approx = model.approximator
    seq, _ = batch()
    h, mask = model.embed(seq)
    x_t, t = torch.randn(len(seq), 16), torch.full((len(seq),), 250.0)
    lam = torch.rand(len(seq), 7, 16)
    u = h + lam * (x_t + approx.time_mlp(timestep_embedding(t, 16)))[:, None]
    out = approx(h, x_t, t, mask, lam=lam)
    if kind == 'gru':
        expected = approx.out_ln(approx.gru(u)[0][:, -1])
    else:
        expected = approx.linear(u[:, -1])
    torch.testing.assert_close(out, expected)
    h2 = h.clone()
    h2[:, 0] += 1.0  # an earlier position: the GRU reads it, the linear layer does not
    changed = (approx(h2, x_t, t, mask, lam=lam) - out).abs().max()
    assert (changed > 1e-4) if kind == 'gru' else (changed == 0)


@pytest.mark.parametrize('kind', ['gru', 'mlp'])
def test_ablations_train(kind):
    """Thirty Adam steps on one batch with a learnable next item cut the diffusion loss fourfold."""
    model = small_model(approximator=kind, n_items=50, dropout=0.0, emb_dropout=0.0).train()
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(1, 51, (64, 7), generator=g)
    labels = seq[:, -1] % 50 + 1  # the next item is the successor of the last one
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(30):
        loss, _, _ = model(seq, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.25 * np.mean(losses[:5]), losses


@pytest.mark.parametrize('kind', ['gru', 'mlp'])
def test_ablation_runs_end_to_end(tmp_path, kind):
    out = str(tmp_path / 'run')
    assert main.main(TINY + ['--approximator', kind, '--out_dir', out]) == 0
    res = read_results(out)
    d = 32
    approximator = 8 * d * d + 5 * d + (6 * d * d + 8 * d if kind == 'gru' else d * d + d)
    assert res['config']['approximator'] == kind and res['n_params'] == 201 * d + 2 * d + approximator
    assert all(np.isfinite(res['epoch_losses'])) and all(np.isfinite(list(res['test'].values())))


# ----------------------------------------------------------------------------------------------------------
# lambda_uncertainty = 0
# ----------------------------------------------------------------------------------------------------------

def test_lambda_zero_draws_zero_and_removes_the_noise_from_the_input():
    model = small_model(lambda_uncertainty=0.0).eval()
    seq, _ = batch()
    h, mask = model.embed(seq)
    x_t, t = torch.randn(len(seq), 16), torch.full((len(seq),), 3.0)
    assert torch.equal(model.approximator.noisy_input(h, x_t, t), h)  # every lambda draw is 0
    out = model.approximator(h, x_t, t, mask)
    assert torch.isfinite(out).all()
    assert torch.equal(model.approximator(h, 5 * torch.randn_like(x_t), t + 100, mask), out)
    # The reverse process ends at t = 0, where the posterior mean is x0_hat: scores no longer depend on the seed.
    torch.manual_seed(7)
    a = model.scores(seq)
    torch.manual_seed(8)
    assert torch.equal(model.scores(seq), a) and torch.isfinite(a).all()


def test_lambda_zero_runs_end_to_end(tmp_path):
    out = str(tmp_path / 'run')
    assert main.main(TINY + ['--lambda_uncertainty', '0', '--out_dir', out]) == 0
    res = read_results(out)
    assert res['config']['lambda_uncertainty'] == 0.0 and res['kept_epoch'] == 1
    assert all(np.isfinite(res['epoch_losses'])) and all(np.isfinite(list(res['test'].values())))


def test_exclude_history_removes_the_whole_history_not_only_the_input_window(tmp_path, monkeypatch):
    """--exclude_history leaves out every item the user interacted with before the predicted item, also the
    ones older than the max_len window of the input."""
    import data
    import metrics
    seen = []
    exclude = metrics.exclude_items

    def recording(scores, histories):
        seen.extend(histories)
        return exclude(scores, histories)

    monkeypatch.setattr(metrics, 'exclude_items', recording)
    out = str(tmp_path / 'run')
    assert main.main(TINY + ['--max_len', '3', '--exclude_history', '--out_dir', out]) == 0
    synthetic = data.make_synthetic()
    val, test = data.histories(synthetic, 'val'), data.histories(synthetic, 'test')
    batch = 64  # TINY: one validation batch, then one test batch
    assert seen == val[:batch] + test[:batch]
    assert min(len(h) for h in seen) > 3  # longer than the input window
