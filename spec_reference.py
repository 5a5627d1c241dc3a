"""A plain, readable implementation of the DiffuRec forward pass, written the way the authors' code computes it
(hand-written LayerNorm and GELU, explicit score matrix, the mask built by repeat to B x H x L x L, every
position through every block). Tests and `bench.py --compare` hold the fast model in model.py against it.

It shares no code with diffurec.py: it reads the fast model's weights by name.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def layer_norm(x, weight, bias, eps=1e-12):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased variance
    return weight * (x - mean) / torch.sqrt(var + eps) + bias


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def linear(layer, x):
    return x @ layer.weight.t() + layer.bias


class PlainApproximator(nn.Module):
    """Wraps a fast `Approximator` and recomputes its forward pass the plain way."""

    def __init__(self, fast, mask_mode='query', dropout=0.0):
        super().__init__()
        self.fast = fast
        self.mask_mode = mask_mode
        self.p = dropout

    def drop(self, x):
        return F.dropout(x, self.p, self.training)

    def attention(self, block, x, mask):
        B, L, d = x.shape
        H = block.attn.heads
        q, k, v = [linear(layer, x).view(B, L, H, d // H).transpose(1, 2)
                   for layer in (block.attn.q, block.attn.k, block.attn.v)]
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // H)  # (B, H, L, L)
        if self.mask_mode == 'query':  # the reference: whole rows of padded queries set to -1e9
            rows = mask.unsqueeze(1).repeat(1, H, 1).unsqueeze(-1).repeat(1, 1, 1, L)
            scores = scores.masked_fill(rows == 0, -1e9)
        else:
            allowed = mask[:, None, None, :].repeat(1, H, L, 1)
            if self.mask_mode == 'causal':
                allowed = allowed & torch.tril(torch.ones(L, L, dtype=torch.bool, device=x.device))
            allowed = allowed | torch.eye(L, dtype=torch.bool, device=x.device)
            scores = scores.masked_fill(~allowed, -1e9)
        probs = self.drop(F.softmax(scores, dim=-1))
        y = (probs @ v).transpose(1, 2).contiguous().view(B, L, d)
        return linear(block.attn.out, y)

    def transformer(self, u, mask):
        x = u
        for block in self.fast.blocks:
            x = x + self.drop(self.attention(block, layer_norm(x, block.ln_attn.weight, block.ln_attn.bias), mask))
            hidden = gelu_tanh(linear(block.w1, layer_norm(x, block.ln_ffn.weight, block.ln_ffn.bias)))
            x = x + self.drop(linear(block.w2, self.drop(hidden)))
            x = self.drop(x)
        return layer_norm(self.drop(x), self.fast.out_ln.weight, self.fast.out_ln.bias)

    def time_embedding(self, t_scaled):
        d = self.fast.hidden_size
        half = d // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t_scaled.device) / half)
        args = t_scaled[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        mlp = self.fast.time_mlp
        return linear(mlp[2], F.silu(linear(mlp[0], emb)))

    def forward(self, h, x_t, t_scaled, mask, lam):
        z = x_t + self.time_embedding(t_scaled)
        return self.transformer(h + lam * z[:, None, :], mask)[:, -1]


def plain_embed(model, seq, dropout=0.0, training=False):
    e = F.dropout(model.item_table.weight[seq], dropout, training)
    return layer_norm(e, model.embed_ln.weight, model.embed_ln.bias), seq > 0


def plain_reverse(model, plain, seq, x_T, step_noise, lam):
    """The reverse process written out with the spec's coefficients (float64 constants)."""
    c = model.diffusion.consts64
    T = model.diffusion.num_timesteps
    h, mask = plain_embed(model, seq)
    x = x_T
    for i, step in enumerate(reversed(range(T))):
        t = torch.full((len(seq),), step)
        x0_hat = plain(h, x, t.float() * 1000.0 / T, mask, lam)
        mean = float(c['posterior_mean_coef1'][step]) * x0_hat + float(c['posterior_mean_coef2'][step]) * x
        if step > 0:
            mean = mean + math.exp(0.5 * c['model_log_variance'][step]) * step_noise[i]
        x = mean
    return x


class PlainDiffuRec(nn.Module):
    """The whole model computed the plain way around a fast DiffuRec's weights: F.dropout (Bernoulli masks),
    hand-written LayerNorm and GELU, lambda from torch.normal, every position through every block.
    Used by `bench.py --compare` as the stand-in for the reference's speed."""

    def __init__(self, fast, dropout, emb_dropout):
        super().__init__()
        self.fast = fast
        self.plain = PlainApproximator(fast.approximator, fast.approximator.attention, dropout)
        self.emb_dropout = emb_dropout
        self.delta = fast.approximator.lambda_uncertainty

    def uncertainty(self, h):
        return torch.normal(mean=torch.full(h.shape, self.delta), std=torch.full(h.shape, self.delta)).to(h.device)

    def forward(self, seq, labels):
        model = self.fast
        h, mask = plain_embed(model, seq, self.emb_dropout, self.training)
        x_start = model.item_table.weight[labels]
        t = torch.randint(0, model.diffusion.num_timesteps, (len(seq),), device=seq.device)
        x_t = model.diffusion.q_sample(x_start, t, torch.randn_like(x_start))
        x0_hat = self.plain(h, x_t, model.diffusion.scale_timesteps(t), mask, self.uncertainty(h))
        return F.cross_entropy(x0_hat @ model.item_table.weight.t(), labels)

    @torch.no_grad()
    def scores(self, seq):
        model = self.fast
        h, mask = plain_embed(model, seq)
        d = model.diffusion
        x = torch.randn(len(seq), h.shape[-1], device=seq.device)
        for step in reversed(range(d.num_timesteps)):
            t = torch.full((len(seq),), step, device=seq.device)
            x0_hat = self.plain(h, x, d.scale_timesteps(t), mask, self.uncertainty(h))
            mean = d.posterior_mean_coef1[step] * x0_hat + d.posterior_mean_coef2[step] * x
            x = mean + (step > 0) * torch.exp(0.5 * d.model_log_variance[step]) * torch.randn_like(x)
        return x @ model.item_table.weight.t()
