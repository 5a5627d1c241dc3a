"""Noise schedules, the Gaussian diffusion over item embeddings, and the Approximator.

DiffuRec (Li, Sun, Li, TOIS 2024) diffuses the embedding of the target item, x_0 = E[label] (d values),
and learns an Approximator f(h, x_t, t) -> x0_hat that reads the embedded history h (B x L x d).
Recommendation runs the reverse process from x_T ~ N(0, I) and ranks items by x_0 . E^T.

Everything here follows the paper and the authors' code (Sections 3 and 4 of the paper); quirks of the
authors' code are named where they are reproduced. Beyond the reference: fast sampling over respaced steps (RespacedDiffusion) and two
ablations of the transformer (GRUApproximator, LinearApproximator).
"""
import functools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SCHEDULES = ('linear', 'trunc_lin', 'pw_lin', 'cosine', 'sqrt', 'trunc_cos')
ATTENTION_MASKS = ('query', 'key', 'causal')
WINDOW_GROUP = 128  # sequences a group in CPU evaluation (Approximator.forward)


# ----------------------------------------------------------------------------------------------------------
# Noise schedules: pure functions returning float64 arrays of length T
# ----------------------------------------------------------------------------------------------------------

def betas_for_alpha_bar(num_steps, alpha_bar, max_beta=0.999):
    """beta_i = min(1 - a((i+1)/T) / a(i/T), max_beta) for i = 0..T-1."""
    return np.array([min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)], dtype=np.float64)


def get_named_beta_schedule(name, num_steps):
    """The beta schedule `name` for `num_steps` diffusion steps, as a float64 array of shape (T,).

    Raises ValueError for an unknown name or a schedule whose betas leave (0, 1] at this T
    (the linear schedule needs T >= 20, for example).
    """
    if num_steps < 1:
        raise ValueError(f'diffusion_steps must be at least 1, got {num_steps}')
    scale = 1000.0 / num_steps
    if name == 'linear':
        betas = np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
    elif name == 'trunc_lin':
        end = scale * 0.02 + 0.01
        if end > 1:
            end = scale * 0.001 + 0.01
        betas = np.linspace(scale * 1e-4 + 0.01, end, num_steps, dtype=np.float64)
    elif name == 'pw_lin':
        if num_steps <= 10:
            raise ValueError(f'noise_schedule pw_lin needs diffusion_steps > 10, got {num_steps}')
        betas = np.concatenate([np.linspace(scale * 1e-4 + 0.01, scale * 1e-4, 10, dtype=np.float64),
                                np.linspace(scale * 1e-4, scale * 0.02, num_steps - 10, dtype=np.float64)])
    elif name == 'cosine':
        betas = betas_for_alpha_bar(num_steps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    elif name == 'sqrt':
        betas = betas_for_alpha_bar(num_steps, lambda t: 1 - math.sqrt(t + 0.0001))
    elif name == 'trunc_cos':
        def alpha_bar(t):
            return math.cos((t + 0.1) / 1.1 * math.pi / 2) ** 2
        betas = np.concatenate([[min(1 - alpha_bar(0), 0.999)], betas_for_alpha_bar(num_steps, alpha_bar)[:-1]])
    else:
        raise ValueError(f'unknown noise_schedule {name!r}; choose one of {", ".join(SCHEDULES)}')
    if not np.all((betas > 0) & (betas <= 1)):
        raise ValueError(f'noise_schedule {name} gives betas outside (0, 1] at diffusion_steps={num_steps} '
                         f'(range {betas.min():.4g}..{betas.max():.4g}); use more steps or another schedule')
    return betas


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim), cosines first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _extract(values, t):
    """values (T,) tensor, t (B,) long -> (B, 1) for broadcasting against (B, d)."""
    return values[t].unsqueeze(-1)


# ----------------------------------------------------------------------------------------------------------
# The Gaussian diffusion
# ----------------------------------------------------------------------------------------------------------

class GaussianDiffusion(nn.Module):
    """Constants of the forward process q and the reverse process p over T steps, computed once in float64.

    Held as (non-persistent) float32 buffers so they follow the model's device.
    """

    def __init__(self, betas, rescale_timesteps=True):
        super().__init__()
        betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        self.rescale_timesteps = rescale_timesteps
        self._respaced = {}  # K -> RespacedDiffusion, see respaced()
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        consts = {
            'betas': betas,
            'alphas_cumprod': alphas_cumprod,
            'sqrt_alphas_cumprod': np.sqrt(alphas_cumprod),
            'sqrt_one_minus_alphas_cumprod': np.sqrt(1.0 - alphas_cumprod),
            'posterior_variance': posterior_variance,
            'posterior_mean_coef1': betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            'posterior_mean_coef2': (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
            # The reverse process uses the larger variance beta_t, except posterior_variance[1] at t = 0
            # (whose posterior variance is 0). With T = 1 there is no beta[1]: fall back to beta[0].
            'model_log_variance': np.log(np.append(posterior_variance[1], betas[1:])
                                         if self.num_timesteps > 1 else betas),
        }
        self.consts64 = consts
        for name, value in consts.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32), persistent=False)

    def scale_timesteps(self, t):
        """t (B,) long -> the value the time embedding sees: t * 1000 / T when rescaling."""
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t.float()

    def q_sample(self, x_start, t, noise):
        """Draw from q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I). x_start, noise (B, d); t (B,)."""
        return (_extract(self.sqrt_alphas_cumprod, t) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t) * noise)

    def q_posterior_mean(self, x_start, x_t, t):
        """Mean of q(x_{t-1} | x_t, x_0) = coef1_t x_0 + coef2_t x_t. All (B, d)."""
        return _extract(self.posterior_mean_coef1, t) * x_start + _extract(self.posterior_mean_coef2, t) * x_t

    def p_mean_variance(self, approximator, h, mask, x_t, t, lam=None):
        """Mean and log-variance of p(x_{t-1} | x_t): the posterior with x_0 replaced by f(h, x_t, t)."""
        x0_hat = approximator(h, x_t, self.scale_timesteps(t), mask, lam=lam)
        return self.q_posterior_mean(x0_hat, x_t, t), _extract(self.model_log_variance, t)

    def p_sample(self, approximator, h, mask, x_t, t, noise=None, lam=None):
        """One reverse step x_t -> x_{t-1} ~ p(x_{t-1} | x_t); no noise is added at t = 0."""
        mean, log_variance = self.p_mean_variance(approximator, h, mask, x_t, t, lam=lam)
        if noise is None:
            noise = torch.randn_like(x_t)
        nonzero = (t != 0).to(x_t.dtype).unsqueeze(-1)
        return mean + nonzero * torch.exp(0.5 * log_variance) * noise

    def p_sample_loop(self, approximator, h, mask, x_T=None, step_noise=None, lam=None):
        """Run the reverse process from x_T (B, d) down to t = 0 and return x_0 (B, d).

        x_T defaults to N(0, I); step_noise, if given, holds one (B, d) tensor per step in the order
        t = T-1, ..., 0. lam fixes the uncertainty draw for every step (the reference draws it anew).
        """
        batch = h.shape[0]
        x_t = torch.randn(batch, h.shape[-1], device=h.device, dtype=h.dtype) if x_T is None else x_T
        for i, step in enumerate(reversed(range(self.num_timesteps))):
            t = torch.full((batch,), step, device=h.device, dtype=torch.long)
            noise = None if step_noise is None else step_noise[i]
            x_t = self.p_sample(approximator, h, mask, x_t, t, noise=noise, lam=lam)
        return x_t

    def respaced(self, steps):
        """The reverse process over `steps` of the T timesteps (fast sampling): a RespacedDiffusion, or
        self when steps == T (so that K = T is exactly the full process, not a float64 recomputation of it)."""
        if steps == self.num_timesteps:
            return self
        if steps not in self._respaced:  # built once per K, not at every batch
            self._respaced[steps] = RespacedDiffusion(self, steps)
        return self._respaced[steps].to(self.betas.device)


def respaced_timesteps(num_steps, steps):
    """The K = `steps` kept timesteps of T = `num_steps`, increasing: s_i = floor(i (T-1) / (K-1) + 1/2).

    i = 0..K-1, so s_0 = 0 and s_{K-1} = T-1 are always kept and the rest are evenly spaced (rounded half
    up, in integers); they are distinct because the stride (T-1)/(K-1) is at least 1. K = 1 keeps T-1
    alone: one call of the approximator on pure noise, whose x0_hat is the result. This is the "evenly
    respaced" sampling of Nichol & Dhariwal (2021), except that their K = 1 keeps step 0.
    """
    if not 1 <= steps <= num_steps:
        raise ValueError(f'sample_steps must lie in [1, {num_steps}] (the diffusion steps T), got {steps}')
    if steps == 1:
        return [num_steps - 1]
    return [(2 * i * (num_steps - 1) + steps - 1) // (2 * (steps - 1)) for i in range(steps)]


class RespacedDiffusion(GaussianDiffusion):
    """The reverse process of `base` restricted to K kept timesteps s_0 < ... < s_{K-1} (respaced_timesteps).

    The K-step process keeps the marginals of the kept steps: abar'_i = abar[s_i], hence
    beta'_i = 1 - abar[s_i] / abar[s_{i-1}] (abar[s_{-1}] = 1), and every constant of GaussianDiffusion
    follows from these betas. Index i runs over 0..K-1; the approximator, trained on the original steps,
    is fed the original timestep s_i (scaled as base scales it), not i.
    """

    def __init__(self, base, steps):
        kept = respaced_timesteps(base.num_timesteps, steps)
        abar = base.consts64['alphas_cumprod'][kept]
        super().__init__(1.0 - abar / np.append(1.0, abar[:-1]), rescale_timesteps=base.rescale_timesteps)
        self.original_num_timesteps = base.num_timesteps
        self.register_buffer('timestep_map', torch.tensor(kept, dtype=torch.long), persistent=False)

    def scale_timesteps(self, t):
        """t (B,) respaced index -> the value the time embedding saw for the original step s_t in training."""
        original = self.timestep_map[t].float()
        if self.rescale_timesteps:
            return original * (1000.0 / self.original_num_timesteps)
        return original


# ----------------------------------------------------------------------------------------------------------
# The Approximator f(h, x_t, t) -> x0_hat
# ----------------------------------------------------------------------------------------------------------

def keep_mask(shape, p, device):
    """Bernoulli(1 - p) keep mask (bool, `shape`), each element cut from 16 random bits.

    One 64-bit random word gives four elements, so this draws a quarter of the random numbers that
    F.dropout's Bernoulli sampling does (docs/performance.md gives what it saves). The keep
    probability is exact to 1/65536.
    """
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, 2 ** 63 - 1)
    return (words.view(torch.int16)[:n] >= round(p * 65536) - 32768).view(shape)


# Floating dtypes whose scaled keep masks scaled_keep_mask builds as integers of the same width.
_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
                   torch.float64: torch.int64}


def scaled_keep_mask(shape, p, dtype, device):
    """keep_mask as `dtype`: 1 / (1 - p) where an element is kept, 0 where it is dropped.

    The values are those of ``keep_mask(...).to(dtype) * (1 / (1 - p))``, built as the scale's bit pattern
    times the 0/1 mask in an integer type of the same width and viewed as `dtype`: a bool-to-bfloat16 cast
    is a slow path on the CPU, an integer product is not (docs/performance.md).
    """
    keep = keep_mask(shape, p, device)
    scale = torch.ones((), dtype=dtype) * (1.0 / (1.0 - p))  # rounded as the float product rounds a 1
    int_type = _SAME_WIDTH_INT.get(dtype)
    if int_type is None:
        return keep.to(dtype) * scale.item()
    return keep.to(int_type).mul_(scale.view(int_type).item()).view(dtype)


def dropout(x, p, training):
    """Inverted dropout: zero each element with probability p, scale the rest by 1 / (1 - p)."""
    if not training or p == 0.0:
        return x
    return x * scaled_keep_mask(x.shape, p, x.dtype, x.device)


class Dropout(nn.Module):
    """nn.Dropout with the cheaper masks of keep_mask()."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return dropout(x, self.p, self.training)

    def extra_repr(self):
        return f'p={self.p}'


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections and an output projection."""

    def __init__(self, hidden_size, heads, dropout):
        super().__init__()
        self.heads = heads
        self.dropout_p = dropout  # a probability: the attention weights' dropout is applied by hand
        self.q = nn.Linear(hidden_size, hidden_size)
        self.k = nn.Linear(hidden_size, hidden_size)
        self.v = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        nn.init.xavier_normal_(self.out.weight)

    def _split(self, x):
        B, L, d = x.shape
        return x.view(B, L, self.heads, d // self.heads).transpose(1, 2)  # (B, H, L, d/H)

    def forward(self, x, query_keep=None, attn_mask=None, last_only=False, residual=None, groups=None, query=None):
        """x (B, L, d) -> (B, L, d), or (B, 1, d) with last_only; plus `residual` (same shape) if given.
        The queries come from `query` (B, L, d) when given, else from x; the keys and values from x.

        query_keep (B, L, 1) zeroes the queries of padded rows: their scores are then all equal and the
        softmax is uniform over all L positions, exactly what the reference's -1e9 fill of whole query
        rows gives (the MASK QUIRK), while real rows attend to every position with no mask at all.
        attn_mask (B, 1, L, L) bool, True = may attend, is the corrected alternative.
        groups (evaluation under the query-row quirk): see windowed().
        """
        B, L, d = x.shape
        k, v = self._split(linear(self.k, x)), self._split(linear(self.v, x))
        if groups is not None and not last_only:
            return linear(self.out, self.windowed(x, query_keep, k, v, groups), residual=residual)
        q_in = x if query is None else query
        q_in = q_in[:, -1:] if last_only else q_in
        q = linear(self.q, q_in)
        if query_keep is not None:
            q = q * (query_keep[:, -1:] if last_only else query_keep).to(q.dtype)
        if attn_mask is not None and last_only:
            attn_mask = attn_mask[:, :, -1:]
        q = self._split(q)
        if self.training and self.dropout_p > 0:  # written out, for the cheaper dropout mask on the probabilities
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, Lq, L)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float('-inf'))
            y = dropout(scores.softmax(-1), self.dropout_p, True) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return linear(self.out, y.transpose(1, 2).reshape(B, q_in.shape[1], d), residual=residual)

    def windowed(self, x, query_keep, k, v, groups):
        """Attention under the query-row quirk for a batch sorted by history length, before the output
        projection: x (B, L, d), k and v (B, H, L, d/H) -> (B, L, d).

        groups: (start, stop, window) for contiguous rows of the batch, window >= the longest history among
        them. Histories are left-padded, so the rows before the last `window` are padding in every sequence of
        the group: their zeroed queries attend uniformly and their output is the mean of the values. Only the
        last `window` rows get queries and go through the attention kernel (15 of 50 rows: a third of the time).
        """
        B, L, d = x.shape
        y = torch.empty_like(x)
        v_mean = v.mean(2).reshape(B, 1, d)  # the heads side by side, as the output projection reads them
        for start, stop, window in groups:
            rows = slice(start, stop)
            q = linear(self.q, x[rows, -window:].contiguous()) * query_keep[rows, -window:].to(x.dtype)
            attended = F.scaled_dot_product_attention(self._split(q), k[rows], v[rows])  # (rows, H, window, d/H)
            y[rows, -window:] = attended.transpose(1, 2).reshape(stop - start, window, d)
            y[rows, :L - window] = v_mean[rows]
        return y


def gelu(z):
    """The reference's GELU: its hand-written tanh approximation, 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))."""
    return F.gelu(z, approximate='tanh')


ACTIVATIONS = {'gelu': gelu, 'relu': F.relu}


@functools.lru_cache(maxsize=None)
def onednn_linear_works(dtype=torch.float32):
    """Whether torch.ops.mkldnn._linear_pointwise, the fused CPU kernel that torch.compile emits, is there and
    agrees with F.linear in `dtype`. It is internal to torch, so it is checked once per dtype rather than trusted
    (on numbers from a generator of its own: drawing from the global one would shift every later draw of the
    run). In bf16 oneDNN has no such kernel on a CPU without native bf16 instructions (AVX2 only, say)."""
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(3, 5, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(4, generator=g)
        x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
        with torch.inference_mode():
            got = torch.ops.mkldnn._linear_pointwise(x, w, b, 'gelu', [], 'tanh')
        tol = 1e-5 if dtype == torch.float32 else 5e-2  # bf16 keeps 8 bits of mantissa
        want = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate='tanh')
        return bool(torch.allclose(got.float(), want, atol=tol, rtol=tol))
    except (AttributeError, RuntimeError):
        return False


def compiling():
    """Whether torch.compile is tracing (it fuses by itself, and does not take the fused op from eager code)."""
    is_compiling = getattr(torch.compiler, 'is_compiling', None)
    if is_compiling is None:  # torch < 2.3
        from torch._dynamo import is_compiling
    return bool(is_compiling())


def linear(layer, x, activation=None, residual=None):
    """ACTIVATIONS[activation](layer(x)), or layer(x) + residual: x (..., in) -> (..., out).

    In CPU inference (float32 or bf16, nothing recorded for autograd) this is one oneDNN product that adds the
    bias and applies the activation (GELU in its tanh form, in bf16 too) or adds the residual as it writes
    the result: no copy of the bias into the output and no second pass over it (docs/performance.md gives
    the measured saving). Elsewhere, and under torch.compile, plain layers.
    """
    if (x.device.type == 'cpu' and x.dtype in (torch.float32, torch.bfloat16) and not torch.is_grad_enabled()
            and not compiling() and onednn_linear_works(x.dtype)):
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, layer.weight, layer.bias, 'add')
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, activation or 'none', [],
                                                  'tanh' if activation == 'gelu' else '')
    y = layer(x)
    if activation is not None:
        y = ACTIVATIONS[activation](y)
    return y if residual is None else residual + y


class TransformerBlock(nn.Module):
    """Pre-LN block: x + Drop(MHA(LN x)), then x + Drop(W2 Drop(act(W1 LN x))), then a dropout on the output.
    The feed-forward is d -> inner_size -> d (4 d when None, the reference's)."""

    def __init__(self, hidden_size, heads, dropout, hidden_act='gelu', inner_size=None):
        super().__init__()
        inner_size = inner_size or 4 * hidden_size
        self.ln_attn = nn.LayerNorm(hidden_size, eps=1e-12)
        self.attn = MultiHeadAttention(hidden_size, heads, dropout)
        self.ln_ffn = nn.LayerNorm(hidden_size, eps=1e-12)
        self.w1 = nn.Linear(hidden_size, inner_size)
        self.w2 = nn.Linear(inner_size, hidden_size)
        nn.init.xavier_normal_(self.w1.weight)
        nn.init.xavier_normal_(self.w2.weight)
        self.dropout = Dropout(dropout)
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f'unknown hidden_act {hidden_act!r}; choose gelu or relu')
        self.hidden_act = hidden_act

    def forward(self, x, query_keep=None, attn_mask=None, last_only=False, groups=None):
        """x (B, L, d) -> (B, L, d); with last_only only the last position is computed: (B, 1, d).
        groups: for the attention in evaluation (MultiHeadAttention.windowed)."""
        residual = x[:, -1:] if last_only else x
        if self.training:
            x = residual + self.dropout(self.attn(self.ln_attn(x), query_keep, attn_mask, last_only))
            hidden = self.dropout(ACTIVATIONS[self.hidden_act](self.w1(self.ln_ffn(x))))
            return self.dropout(x + self.dropout(self.w2(hidden)))
        # evaluation: every dropout is the identity, so the residual sums can go into the output products
        x = self.attn(self.ln_attn(x), query_keep, attn_mask, last_only, residual=residual, groups=groups)
        return linear(self.w2, linear(self.w1, self.ln_ffn(x), self.hidden_act), residual=x)


def attention_mask(mask, mode):
    """Masks for the attention of `mode` from mask (B, L) bool (True = real item).

    Returns (query_keep, attn_mask): query_keep (B, L, 1) float for the reference's query-row quirk,
    attn_mask (B, 1, L, L) bool for the key and causal corrections. A padded row may always attend to
    itself, so no row is empty (its output never reaches a real position).
    """
    if mode == 'query':
        return mask.unsqueeze(-1).float(), None
    L = mask.shape[1]
    eye = torch.eye(L, dtype=torch.bool, device=mask.device)
    allowed = mask[:, None, :].expand(-1, L, -1)  # (B, Lq, Lk): key j is real
    if mode == 'causal':
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()
    elif mode != 'key':
        raise ValueError(f'unknown attention_mask {mode!r}; choose one of {", ".join(ATTENTION_MASKS)}')
    return None, (allowed | eye).unsqueeze(1)


class NoisyInput(nn.Module):
    """The input every approximator reads: u = h + lambda * (x_t + time_mlp(emb(t))), (B, L, d).

    lambda ~ N(delta, delta^2) elementwise (B, L, d), drawn anew on each call unless given; with
    delta = 0 every draw is 0 and u = h.
    """

    def __init__(self, hidden_size, lambda_uncertainty):
        super().__init__()
        self.hidden_size = hidden_size
        self.lambda_uncertainty = lambda_uncertainty
        self.time_mlp = nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size), nn.SiLU(),
                                      nn.Linear(4 * hidden_size, hidden_size))

    def draw_lambda(self, h):
        """lambda ~ N(delta, delta^2), one draw per element of h (B, L, d)."""
        return torch.randn_like(h).mul_(self.lambda_uncertainty).add_(self.lambda_uncertainty)

    def noisy_input(self, h, x_t, t_scaled, lam=None):
        """h (B, L, d), x_t (B, d), t_scaled (B,) float -> u (B, L, d)."""
        z = x_t + self.time_mlp(timestep_embedding(t_scaled, self.hidden_size).to(x_t.dtype))  # (B, d)
        if lam is None:
            lam = self.draw_lambda(h)
        return h + lam * z[:, None, :]


class Approximator(NoisyInput):
    """f(h, x_t, t) -> x0_hat: a transformer over h + lambda * (x_t + time_mlp(emb(t))).

    lambda ~ N(delta, delta^2) elementwise (B, L, d), drawn anew on each call unless given.
    """

    def __init__(self, hidden_size=128, num_blocks=4, heads=4, dropout=0.1, lambda_uncertainty=0.001,
                 hidden_act='gelu', attention='query'):
        super().__init__(hidden_size, lambda_uncertainty)
        if hidden_size % heads:
            raise ValueError(f'hidden_size {hidden_size} is not divisible by {heads} heads')
        if attention not in ATTENTION_MASKS:
            raise ValueError(f'unknown attention_mask {attention!r}; choose one of {", ".join(ATTENTION_MASKS)}')
        self.attention = attention
        self.blocks = nn.ModuleList(TransformerBlock(hidden_size, heads, dropout, hidden_act)
                                    for _ in range(num_blocks))
        self.dropout = Dropout(dropout)
        self.out_ln = nn.LayerNorm(hidden_size, eps=1e-12)

    def transformer(self, u, mask, last_only=False, groups=None):
        """u (B, L, d), mask (B, L) bool -> out_ln(Drop(blocks(u))): (B, L, d), or (B, 1, d) with last_only."""
        query_keep, attn_mask = attention_mask(mask, self.attention)
        for i, block in enumerate(self.blocks):
            u = block(u, query_keep, attn_mask, last_only and i == len(self.blocks) - 1, groups)
        return self.out_ln(self.dropout(u))

    def forward(self, h, x_t, t_scaled, mask, lam=None):
        """h (B, L, d), x_t (B, d), t_scaled (B,) float, mask (B, L) bool -> x0_hat (B, d).

        Only the last position leaves the transformer, so the last block computes only that position.
        """
        u = self.noisy_input(h, x_t, t_scaled, lam)  # (B, L, d)
        if self.training or self.attention != 'query' or u.device.type != 'cpu' or not left_padded(mask):
            return self.transformer(u, mask, last_only=True)[:, -1]
        # CPU evaluation of left-padded histories: sequences sorted by history length and taken in groups whose
        # attention needs only their last rows (MultiHeadAttention.windowed); the result goes back to input order
        lengths = mask.sum(1)
        order = lengths.argsort()
        sorted_lengths = lengths[order].tolist()
        groups = []  # (start, stop, window): the window is the group's longest history (its last row's)
        for start in range(0, len(order), WINDOW_GROUP):
            stop = min(start + WINDOW_GROUP, len(order))
            groups.append((start, stop, max(sorted_lengths[stop - 1], 1)))
        x0_hat = self.transformer(u[order], mask[order], last_only=True, groups=groups)[:, -1]
        return x0_hat[order.argsort()]


def left_padded(mask):
    """Whether every row of mask (B, L) bool is padding then items (no padding after an item): what the
    windowed CPU attention assumes. Other rows take the whole attention, as on a GPU."""
    return not bool((mask[:, 1:] < mask[:, :-1]).any())


class GRUApproximator(NoisyInput):
    """Ablation: one GRU layer (d -> d) over the noisy input u, its last position, then Dropout and LayerNorm
    as the transformer's output. Histories are left-padded, so the last position is the latest real item;
    the GRU reads the padding before it (the mask is unused)."""

    def __init__(self, hidden_size=128, dropout=0.1, lambda_uncertainty=0.001):
        super().__init__(hidden_size, lambda_uncertainty)
        self.gru = nn.GRU(hidden_size, hidden_size, batch_first=True)
        self.dropout = Dropout(dropout)
        self.out_ln = nn.LayerNorm(hidden_size, eps=1e-12)

    def forward(self, h, x_t, t_scaled, mask, lam=None):
        """h (B, L, d), x_t (B, d), t_scaled (B,) float, mask (B, L) bool (unused) -> x0_hat (B, d)."""
        out, _ = self.gru(self.noisy_input(h, x_t, t_scaled, lam))  # (B, L, d)
        return self.out_ln(self.dropout(out[:, -1]))


class LinearApproximator(NoisyInput):
    """Ablation ("mlp"): one linear layer d -> d on the last position of the noisy input u; the history
    reaches it only through that position's embedding."""

    def __init__(self, hidden_size=128, lambda_uncertainty=0.001):
        super().__init__(hidden_size, lambda_uncertainty)
        self.linear = nn.Linear(hidden_size, hidden_size)

    def forward(self, h, x_t, t_scaled, mask, lam=None):
        """h (B, L, d), x_t (B, d), t_scaled (B,) float, mask (B, L) bool (unused) -> x0_hat (B, d)."""
        return self.linear(self.noisy_input(h, x_t, t_scaled, lam)[:, -1])


APPROXIMATORS = ('transformer', 'gru', 'mlp')


def build_approximator(kind, hidden_size=128, num_blocks=4, heads=4, dropout=0.1, lambda_uncertainty=0.001,
                       hidden_act='gelu', attention='query'):
    """The approximator named `kind`; num_blocks, heads, hidden_act and attention concern the transformer only."""
    if kind == 'transformer':
        return Approximator(hidden_size, num_blocks, heads, dropout, lambda_uncertainty, hidden_act, attention)
    if kind == 'gru':
        return GRUApproximator(hidden_size, dropout, lambda_uncertainty)
    if kind == 'mlp':
        return LinearApproximator(hidden_size, lambda_uncertainty)
    raise ValueError(f'unknown approximator {kind!r}; choose one of {", ".join(APPROXIMATORS)}')
