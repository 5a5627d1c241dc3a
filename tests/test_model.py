"""The fast model against the plain spec implementation (tests/spec_reference.py), and the reference quirks."""
import contextlib
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from diffurec import Dropout, keep_mask, linear, onednn_linear_works, scaled_keep_mask
from model import DiffuRec
from spec_reference import PlainApproximator, plain_embed, plain_reverse
from metrics import evaluate, label_ranks, rank_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_model(mask='query', n_items=30, d=16, blocks=2, **kw):
    torch.manual_seed(0)
    return DiffuRec(n_items, hidden_size=d, num_blocks=blocks, heads=4, diffusion_steps=8,
                    attention_mask=mask, **kw)


def batch(n_items=30, B=6, L=7):
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(1, n_items + 1, (B, L), generator=g)
    for i in range(B):
        seq[i, :i] = 0  # left padding of every length 0..B-1
    return seq, torch.randint(1, n_items + 1, (B,), generator=g)


def test_parameter_count_at_defaults_on_amazon_beauty():
    model = DiffuRec(12101)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2_474_368
    assert model.item_table.weight.numel() == 1_549_056


@pytest.mark.parametrize('mask', ['query', 'key', 'causal'])
@pytest.mark.parametrize('mode', ['train', 'eval', 'inference'])
def test_fast_approximator_equals_plain_spec(mask, mode):
    """Dropout rates set to 0 so that training mode is deterministic too (atol 1e-5, fp32). 'inference' runs
    the fused CPU products of diffurec.linear, 'eval' the same evaluation path with autograd recording."""
    training = mode == 'train'
    model = small_model(mask, dropout=0.0, emb_dropout=0.0).train(training)
    plain = PlainApproximator(model.approximator, mask).train(training)
    seq, _ = batch()
    h, m = model.embed(seq)
    h_plain, _ = plain_embed(model, seq)
    torch.testing.assert_close(h, h_plain, atol=1e-5, rtol=0)
    x_t, t = torch.randn(len(seq), 16), torch.randint(0, 8, (len(seq),))
    lam = torch.randn(len(seq), 7, 16) * 0.5
    ts = model.diffusion.scale_timesteps(t)
    if mode == 'inference':  # the fused products, or the plain layers where the kernel does not work
        with torch.inference_mode():
            fast = model.approximator(h.detach(), x_t, ts, m, lam=lam)
    else:
        fast = model.approximator(h, x_t, ts, m, lam=lam)
    torch.testing.assert_close(fast, plain(h, x_t, ts, m, lam), atol=1e-5, rtol=0)
    if training:  # gradients agree as well
        fast.sum().backward()
        g_fast = [p.grad.clone() for p in model.approximator.parameters()]
        model.zero_grad()
        plain(h.detach(), x_t, ts, m, lam).sum().backward()
        for a, b in zip(g_fast, [p.grad for p in model.approximator.parameters()]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_the_fused_cpu_kernel_works_in_fp32_on_x86():
    """The CPU evaluation speed of docs/performance.md rests on oneDNN's fused linear kernel, internal to
    torch: on an x86-64 CPU it must be there and agree with F.linear in fp32, so that a torch that drops or
    changes it fails here rather than slowing evaluation down unnoticed."""
    if platform.machine().lower() in ('x86_64', 'amd64'):
        assert onednn_linear_works(torch.float32)
    with torch.inference_mode():  # fused or not, the inference layer is the linear layer and its GELU
        layer = torch.nn.Linear(8, 4)
        x = torch.randn(3, 8)
        torch.testing.assert_close(linear(layer, x, 'gelu'), F.gelu(F.linear(x, layer.weight, layer.bias),
                                                                     approximate='tanh'), atol=1e-5, rtol=0)


@pytest.mark.parametrize('hidden_act', ['gelu', 'relu'])
def test_fused_inference_products_equal_the_plain_layers(hidden_act):
    """diffurec.linear in inference (bias, activation, residual inside oneDNN's product) against the same
    model with autograd recording (plain nn.Linear), through the whole reverse process. Where the kernel
    does not work, inference takes the plain layers, which must agree as well."""
    model = small_model(hidden_act=hidden_act).eval()
    seq, _ = batch()
    h, m = model.embed(seq)
    x_T, noise = torch.randn(len(seq), 16), [torch.randn(len(seq), 16) for _ in range(8)]
    lam = torch.randn(len(seq), 7, 16) * 0.01
    plain = model.diffusion.p_sample_loop(model.approximator, h, m, x_T=x_T, step_noise=noise, lam=lam)
    with torch.inference_mode():
        fused = model.diffusion.p_sample_loop(model.approximator, h, m, x_T=x_T, step_noise=noise, lam=lam)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)

@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # torch.compile's own use of torch.jit
def test_compiled_evaluation_equals_eager():
    """--compile on the CPU: torch.compile traces the plain layers (the fused oneDNN products are for eager
    evaluation only; inductor cannot lower them from eager code) and gives the eager numbers."""
    model = small_model().eval()
    seq, _ = batch()
    h, m = model.embed(seq)
    x_t, ts = torch.randn(len(seq), 16), model.diffusion.scale_timesteps(torch.full((len(seq),), 5))
    lam = torch.full((len(seq), 7, 16), 0.001)
    with torch.no_grad():
        eager = model.approximator(h, x_t, ts, m, lam=lam)
        compiled = torch.compile(model.approximator)(h, x_t, ts, m, lam=lam)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)

@pytest.mark.parametrize('activation', [None, 'gelu', 'relu'])
def test_bf16_inference_products_equal_the_layer_in_bf16(activation):
    """diffurec.linear in bf16 inference: oneDNN's fused product where the CPU has one in bf16, the plain layer
    where it has none (a CPU without native bf16, on which the fused op raises); either way the layer's value."""
    from diffurec import ACTIVATIONS, linear
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 24).to(torch.bfloat16)
    x = torch.randn(3, 5, 16).to(torch.bfloat16)
    with torch.inference_mode():
        got = linear(layer, x, activation)
    want = layer(x).float()
    want = ACTIVATIONS[activation](want) if activation else want
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


def test_fused_kernel_check_leaves_the_global_generator_alone():
    """The one-time check runs whenever a process first evaluates: drawing from the global generator there
    would make a resumed run draw differently from an uninterrupted one."""
    onednn_linear_works.cache_clear()
    state = torch.get_rng_state()
    onednn_linear_works()
    assert torch.equal(torch.get_rng_state(), state)

@pytest.mark.parametrize('inference', [False, True])
def test_windowed_attention_of_sorted_groups_equals_plain_spec(monkeypatch, inference):
    """CPU evaluation sorts the sequences by history length and gives each group's padded rows the mean of
    the values without scores (MultiHeadAttention.windowed). Groups of 2 here: windows 3, 5 and 7 of L = 7."""
    import diffurec
    monkeypatch.setattr(diffurec, 'WINDOW_GROUP', 2)
    windows = []
    full = diffurec.MultiHeadAttention.windowed

    def spy(self, x, query_keep, k, v, groups):
        windows.append([w for _, _, w in groups])
        return full(self, x, query_keep, k, v, groups)
    monkeypatch.setattr(diffurec.MultiHeadAttention, 'windowed', spy)
    model = small_model(dropout=0.0, emb_dropout=0.0).eval()
    plain = PlainApproximator(model.approximator).eval()
    seq, _ = batch()
    h, m = model.embed(seq)
    x_t, ts = torch.randn(len(seq), 16), model.diffusion.scale_timesteps(torch.randint(0, 8, (len(seq),)))
    lam = torch.randn(len(seq), 7, 16) * 0.5
    with torch.inference_mode() if inference else contextlib.nullcontext():
        fast = model.approximator(h, x_t, ts, m, lam=lam)
    torch.testing.assert_close(fast, plain(h, x_t, ts, m, lam), atol=1e-5, rtol=0)
    assert windows and all(w == [3, 5, 7] for w in windows)  # every full block; the last block needs none

def test_reverse_process_equals_plain_spec():
    model = small_model(dropout=0.0, emb_dropout=0.0).eval()
    plain = PlainApproximator(model.approximator).eval()
    seq, _ = batch()
    x_T = torch.randn(len(seq), 16)
    noise = [torch.randn(len(seq), 16) for _ in range(8)]
    lam = torch.randn(len(seq), 7, 16) * 0.01
    h, m = model.embed(seq)
    fast = model.diffusion.p_sample_loop(model.approximator, h, m, x_T=x_T, step_noise=noise, lam=lam)
    torch.testing.assert_close(fast, plain_reverse(model, plain, seq, x_T, noise, lam), atol=1e-5, rtol=0)


def test_query_mask_quirk():
    """A padded query row attends uniformly to all L positions; real rows attend to padding too."""
    model = small_model('query').eval()
    block = model.approximator.blocks[0]
    seq, _ = batch()
    h, m = model.embed(seq)
    out = block.attn(h, m.unsqueeze(-1).float())
    v = block.attn.v(h)
    uniform = block.attn.out(v.mean(1, keepdim=True)).expand_as(out)  # mean of v over all L positions
    torch.testing.assert_close(out[~m], uniform[~m], atol=1e-5, rtol=0)
    # Real rows see padded positions: changing a padded embedding changes the last (real) output.
    h2 = h.clone()
    h2[3, 0] += 1.0  # row 3 has 3 padded positions
    out2 = block.attn(h2, m.unsqueeze(-1).float())
    assert (out2[3, -1] - out[3, -1]).abs().max() > 1e-4


def test_key_mask_hides_padding_from_real_positions():
    model = small_model('key').eval()
    seq, _ = batch()
    h, m = model.embed(seq)
    x_t, t = torch.randn(len(seq), 16), torch.full((len(seq),), 3)
    lam = torch.full((len(seq), 7, 16), 0.01)
    out = model.approximator(h, x_t, t.float(), m, lam=lam)
    h2 = h.clone()
    h2[~m] = torch.randn_like(h2[~m]) * 5
    torch.testing.assert_close(model.approximator(h2, x_t, t.float(), m, lam=lam), out)


def test_loss_and_ranking_include_the_padding_row():
    model = small_model().eval()
    x = torch.randn(4, 16)
    logits = model.logits(x)
    assert logits.shape == (4, 31) and torch.isfinite(logits[:, 0]).all()
    corrected = small_model(rank_padding=False).eval()
    assert torch.isinf(corrected.logits(x)[:, 0]).all()
    seq, _ = batch()
    assert torch.isinf(corrected.scores(seq)[:, 0]).all()
    assert torch.isfinite(model.scores(seq)[:, 0]).all()


def under_seed(seed, fn, *args):
    """fn(*args) with torch's generator seeded first: the same draws of the reverse process for each call."""
    torch.manual_seed(seed)
    return fn(*args)


def test_reverse_sampling_is_reproducible_under_a_seed():
    model = small_model().eval()
    seq, _ = batch()
    a, b, c = (under_seed(seed, model.scores, seq) for seed in (7, 7, 8))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c)


def test_dropout_keep_rate_and_scale():
    torch.manual_seed(0)
    for p in (0.1, 0.3, 0.5):
        keep = keep_mask((2_000_000,), p, 'cpu').float().mean().item()
        assert abs(keep - (1 - p)) < 4 * ((p * (1 - p) / 2e6) ** 0.5) + 2e-5  # within 4 sigma
    x = torch.ones(1_000_000)
    y = Dropout(0.3).train()(x)
    values = torch.unique(y).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.7)
    assert abs(y.mean().item() - 1.0) < 0.01  # expectation preserved
    assert torch.equal(Dropout(0.3).eval()(x), x)
    # Neighbouring elements are independent (the four 16-bit slices of one word do not move together).
    m = keep_mask((1_000_000,), 0.5, 'cpu').view(-1, 4).float()
    corr = torch.corrcoef(m.t())
    assert (corr - torch.eye(4)).abs().max() < 0.01


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_scaled_keep_mask_equals_the_cast_mask_times_the_scale_bit_for_bit(dtype):
    """The integer-built mask must give the values of the float cast and product it replaces, so that a
    training run cut before the change and resumed after it trains as the uncut one."""
    for p in (0.1, 0.2, 0.3, 0.5, 1 / 3, 0.05, 0.9):
        torch.manual_seed(3)
        built = scaled_keep_mask((7, 1001), p, dtype, 'cpu')
        torch.manual_seed(3)
        expected = keep_mask((7, 1001), p, 'cpu').to(dtype) * (1.0 / (1.0 - p))
        assert built.dtype == dtype and built.shape == (7, 1001)
        assert torch.equal(built.view(-1), expected.view(-1))
        assert sorted(torch.unique(built).tolist())[0] == 0.0 and len(torch.unique(built)) == 2
    x = torch.randn(64, 50, dtype=dtype)
    torch.manual_seed(5)
    y = Dropout(0.2).train()(x)
    torch.manual_seed(5)
    assert torch.equal(y, x * (keep_mask(x.shape, 0.2, 'cpu').to(dtype) * (1.0 / 0.8)))


def test_metric_golden_example():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.5, 0.2, 0.05], [0.7, 0.1, 0.2, 0.3, 0.6, 0.4],
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    per_row = rank_metrics(label_ranks(scores, torch.tensor([3, 2, 0])), [1, 2, 5]).mean(0)
    expected = [0, 1 / 3, 2 / 3, 0, 0.2103099, 0.3392608]  # HR@1, HR@2, HR@5, NDCG@1, NDCG@2, NDCG@5
    torch.testing.assert_close(per_row, torch.tensor(expected, dtype=torch.float64), atol=1e-7, rtol=0)


def test_ties_count_against_the_label_and_non_finite_labels_rank_last():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.1, 0.9, 0.9, 0.2], [0.3, float('nan'), 0.1, 0.2],
                           [0.3, float('-inf'), 0.1, 0.2]])
    ranks = label_ranks(scores, torch.tensor([2, 1, 1, 1]))
    # all tied: last of 4; tied with one other: 2; NaN and -inf labels: last
    assert ranks.tolist() == [4, 2, 4, 4]


def test_a_collapsed_model_scores_no_hits():
    """Every item scores the same: HR@K must be at most K / n_items, not 100 (ties count against the label)."""
    class Collapsed(torch.nn.Module):
        n_items = 40

        def scores(self, seq, sample_steps=None):
            return torch.zeros(len(seq), self.n_items + 1)

    inputs, labels = torch.randint(1, 41, (32, 5)), torch.randint(1, 41, (32,))
    result = evaluate(Collapsed(), inputs, labels, [5, 10], 8, torch.device('cpu'), show_progress=False)
    assert result['HR@10'] <= 100 * 10 / 40 and result['HR@5'] <= 100 * 5 / 40
    assert result == dict.fromkeys(['HR@5', 'HR@10', 'NDCG@5', 'NDCG@10'], 0.0)


def test_bf16_sampling_copy_stays_close_to_fp32():
    """The bf16 evaluation path: same function up to bf16 rounding, float32 in and out, the original untouched."""
    model = small_model().eval()
    low = model.low_precision_copy()
    assert model.approximator.out_ln.weight.dtype == torch.float32
    seq, _ = batch()
    h, m = model.embed(seq)
    x_t, t = torch.randn(len(seq), 16), torch.full((len(seq),), 3)
    lam = torch.full((len(seq), 7, 16), 0.001)
    ts = model.diffusion.scale_timesteps(t)
    ref = model.approximator(h, x_t, ts, m, lam=lam)
    out = low.approximator(h, x_t, ts, m, lam=lam)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.05)  # bf16 keeps about 3 significant digits
    torch.manual_seed(3)
    s32 = model.scores(seq)
    torch.manual_seed(3)
    s16 = low.scores(seq)
    assert s16.dtype == torch.float32
    top32, top16 = s32.topk(5).indices, s16.topk(5).indices
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top32, top16)) / top32.numel()
    assert overlap >= 0.8


ALLOCATE_64MB_REPEATEDLY = '''
import resource, sys, torch, utils
if sys.argv[1] == "keep":
    assert utils.keep_freed_memory()
faults = []
for _ in range(24):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(2 ** 24)  # 64 MiB, written, freed
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc settings')
def test_freed_memory_is_reused_without_page_faults():
    """keep_freed_memory (main.py and bench.py call it): once the heap has grown to fit, a large block freed and
    allocated again costs no new page faults; without it, glibc unmaps and maps each one anew (16,384 pages of
    4 KiB per 64 MiB)."""
    def faults(mode):
        out = subprocess.run([sys.executable, '-c', ALLOCATE_64MB_REPEATEDLY, mode], capture_output=True,
                             text=True, cwd=ROOT, check=True)
        return [int(n) for n in out.stdout.split()]
    assert all(n > 16384 / 2 for n in faults('default'))
    # With the setting, the heap still grows by a block at a time over the first ten or so blocks before freed
    # ones are reused (a fixed 8-block warm-up was sometimes one short), so only the last 8 of 24 count.
    assert sum(faults('keep')[-8:]) < 1000
