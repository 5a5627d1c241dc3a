"""Golden values of the diffusion: schedules, posterior coefficients, log-variance, time embedding, samplers."""
import numpy as np
import pytest
import torch

from diffurec import GaussianDiffusion, SCHEDULES, get_named_beta_schedule, timestep_embedding
from step_sample import LossSecondMomentResampler, create_named_schedule_sampler

# schedule: beta[0], beta[1], beta[-1], sum, alphas_cumprod[-1] at T = 32
GOLDEN_SCHEDULES = {
    'trunc_lin': (0.0131250000, 0.0331854839, 0.6350000000, 10.3700000000, 9.9012987666e-07),
    'linear': (0.0031250000, 0.0231854839, 0.6250000000, 10.0500000000, 1.6492403985e-06),
    'cosine': (0.0035815734, 0.0083158770, 0.9990000000, 5.6943235459, 2.3699702711e-06),
    'sqrt': (0.1687467799, 0.0888771318, 0.9990000000, 4.6762335680, 1.5856784857e-05),
    'trunc_cos': (0.0202535132, 0.0147640746, 0.7495014930, 4.8588236688, 1.9900597960e-03),
    'pw_lin': (0.0131250000, 0.0120138889, 0.6250000000, 6.9906250000, 9.4915043063e-05),
}


@pytest.mark.parametrize('name', SCHEDULES)
def test_schedule_golden_values(name):
    betas = get_named_beta_schedule(name, 32)
    assert betas.dtype == np.float64 and betas.shape == (32,)
    b0, b1, blast, total, abar_last = GOLDEN_SCHEDULES[name]
    np.testing.assert_allclose([betas[0], betas[1], betas[-1], betas.sum()], [b0, b1, blast, total], atol=1e-9)
    np.testing.assert_allclose(np.cumprod(1 - betas)[-1], abar_last, rtol=1e-7)


def test_trunc_lin_at_ten_steps():
    betas = get_named_beta_schedule('trunc_lin', 10)
    np.testing.assert_allclose([betas[0], betas[-1]], [0.02, 0.11], atol=1e-12)


@pytest.mark.parametrize('name, steps', [('bogus', 32), ('linear', 10), ('pw_lin', 8)])
def test_invalid_schedules_are_refused(name, steps):
    with pytest.raises(ValueError, match='noise_schedule'):
        get_named_beta_schedule(name, steps)


def test_posterior_coefficients_and_log_variance():
    d = GaussianDiffusion(get_named_beta_schedule('trunc_lin', 32))
    c = d.consts64
    np.testing.assert_allclose(c['posterior_mean_coef1'][31], 0.0010458606, atol=1e-10)
    np.testing.assert_allclose(c['posterior_mean_coef2'][31], 0.6041512580, atol=1e-10)
    np.testing.assert_allclose(c['posterior_variance'][1], 0.0094945001, atol=1e-10)
    np.testing.assert_allclose(c['model_log_variance'][[0, 31]], [-4.6570425813, -0.4541302801], atol=1e-9)


def test_q_sample_is_the_closed_form():
    d = GaussianDiffusion(get_named_beta_schedule('trunc_lin', 32))
    x0, eps, t = torch.randn(5, 4), torch.randn(5, 4), torch.tensor([0, 3, 7, 15, 31])
    abar = torch.tensor(np.cumprod(1 - d.consts64['betas']), dtype=torch.float32)[t, None]
    torch.testing.assert_close(d.q_sample(x0, t, eps), abar.sqrt() * x0 + (1 - abar).sqrt() * eps)


def test_timestep_embedding_golden():
    t = torch.tensor([0, 5]).float() * 1000 / 32
    emb = timestep_embedding(t, 8)
    expected = [[1, 1, 1, 1, 0, 0, 0, 0],
                [0.675147, -0.996561, 0.008296, 0.987818, -0.737683, 0.082868, 0.999966, 0.155615]]
    torch.testing.assert_close(emb, torch.tensor(expected), atol=1e-5, rtol=0)


def test_samplers_return_t_and_importance_weights():
    uniform = create_named_schedule_sampler('uniform', 32)
    t, w = uniform.sample(1000, 'cpu')
    assert t.min() >= 0 and t.max() < 32 and torch.allclose(w, torch.ones(1000))
    fix = create_named_schedule_sampler('fixstep', 32)
    t, w = fix.sample(20000, 'cpu')
    first = (t < 16).float().mean().item()
    assert abs(first - 2 / 3) < 0.02  # weights 1 : 0.5 -> p(first half) = 2/3
    torch.testing.assert_close(w[t < 16], torch.full_like(w[t < 16], 0.75))  # 1 / (T p_t), p_t = 1/24
    with pytest.raises(ValueError, match='schedule_sampler_name'):
        create_named_schedule_sampler('nope', 32)


def test_lossaware_is_uniform_until_fed_then_follows_losses():
    s = LossSecondMomentResampler(4)
    np.testing.assert_array_equal(s.weights(), np.ones(4))
    for _ in range(10):
        s.update_with_all_losses([0, 1, 2, 3], [1.0, 1.0, 1.0, 9.0])
    w = s.weights()
    assert s.warmed_up() and w[3] > 0.7 and abs(w.sum() - 1) < 1e-12
    restored = LossSecondMomentResampler(4)
    restored.load_state_dict(s.state_dict())
    np.testing.assert_array_equal(restored.weights(), w)
