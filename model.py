"""The recommender around the diffusion: item table, embedding stage, training loss and scoring.

Training (the paper's Eq. for the loss, as the authors' code computes it): x_0 = E[label], t ~ sampler, x_t = q_sample(x_0, t, eps), x0_hat = f(h, x_t, t),
loss = cross-entropy(x0_hat E^T, label) over all n_items + 1 rows.
Inference: x_0 from the reverse process, scores = x_0 E^T ("inner") or minus the squared distance ("routing").
"""
import copy
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffurec import Dropout, GaussianDiffusion, build_approximator, get_named_beta_schedule
from sasrec import SASRec
from step_sample import create_named_schedule_sampler

ROUNDINGS = ('inner', 'routing')


class Recommender(Protocol):
    """What main.py, the trainer, bench.py and the evaluation loop ask of a model of --model (DiffuRec, SASRec).

    Class attributes: `name` (the --model value), `title` (for logs), `preset` (the defaults of the flags not
    given on the command line), `own_flags` (flags no other model reads: given with another --model, an error);
    optionally `published_presets` ({dataset: the defaults --preset published sets on top of `preset`}).
    `sampler`: the timestep sampler whose state a checkpoint keeps, or None.
    Training: forward(seq (B, L), targets) -> (mean loss, per-row losses (B,), timesteps (B,) or None); a
    batch's weight in the epoch's mean loss is loss_units(targets) (its samples, or its real target positions).
    Evaluation: scores(seq (B, L), sample_steps) -> (B, n_items + 1), higher is better.
    """
    name: str
    title: str
    preset: dict
    own_flags: tuple
    sampler: object

    @classmethod
    def from_config(cls, cfg, n_items):
        """The model of a main.py config (argparse namespace or dict) over n_items items."""

    @staticmethod
    def training_samples(data, max_len, prefix_samples):
        """The (inputs, targets) it trains on, given data.build_samples' prefix samples of the train split."""

    @staticmethod
    def loss_units(targets):
        """The weight of a batch of targets in the epoch's mean loss."""

    def forward(self, seq, targets):
        """The training loss (see the class docstring)."""

    def scores(self, seq, sample_steps=None):
        """Scores over every row of the item table."""

    def low_precision_copy(self, dtype=torch.bfloat16):
        """A copy that evaluates in dtype (--precision bf16)."""

    def compile_for_speed(self):
        """--compile: torch.compile what pays, in place (the state dict keeps its names)."""


class CastingApproximator(nn.Module):
    """Runs `approximator` (already converted to `dtype`) on float32 inputs and returns float32."""

    def __init__(self, approximator, dtype):
        super().__init__()
        self.inner, self.dtype = approximator, dtype

    def forward(self, h, x_t, t_scaled, mask, lam=None):
        if lam is None:  # drawn in float32: torch's bf16 normal_ takes twice as long on the CPU
            lam = self.inner.draw_lambda(h)
        return self.inner(h.to(self.dtype), x_t.to(self.dtype), t_scaled, mask, lam=lam.to(self.dtype)).float()


class DiffuRec(nn.Module):
    """DiffuRec over n_items items (ids 1..n_items, 0 = padding); the item table has n_items + 1 rows.

    Reference quirks kept by default and their switches:
      attention_mask='query'  padded query rows masked instead of padded keys (Approximator docs)
      rank_padding=True       the padding row takes part in the softmax of the loss and in the ranking
    """

    name, title = 'diffurec', 'DiffuRec'
    preset = {}  # the parser's defaults are the reference's
    # Flags that configure the diffusion alone; given with another --model they are an error, not ignored.
    own_flags = ('diffusion_steps', 'noise_schedule', 'schedule_sampler_name', 'lambda_uncertainty',
                 'rescale_timesteps', 'attention_mask', 'rounding', 'approximator', 'sample_steps',
                 'eval_sample_steps', 'update_lossaware')

    def __init__(self, n_items, hidden_size=128, num_blocks=4, heads=4, dropout=0.1, emb_dropout=0.3,
                 lambda_uncertainty=0.001, hidden_act='gelu', diffusion_steps=32, noise_schedule='trunc_lin',
                 rescale_timesteps=True, schedule_sampler_name='lossaware', attention_mask='query',
                 rank_padding=True, rounding='inner', approximator='transformer'):
        super().__init__()
        if rounding not in ROUNDINGS:
            raise ValueError(f'unknown rounding {rounding!r}; choose one of {", ".join(ROUNDINGS)}')
        self.n_items = n_items
        self.rank_padding = rank_padding
        self.rounding = rounding
        self.item_table = nn.Embedding(n_items + 1, hidden_size)  # N(0, 1) init; row 0 is learned too
        self.embed_dropout = Dropout(emb_dropout)
        self.embed_ln = nn.LayerNorm(hidden_size, eps=1e-12)
        self.diffusion = GaussianDiffusion(get_named_beta_schedule(noise_schedule, diffusion_steps),
                                           rescale_timesteps=rescale_timesteps)
        self.approximator = build_approximator(approximator, hidden_size, num_blocks, heads, dropout,
                                               lambda_uncertainty, hidden_act, attention_mask)
        self.sampler = create_named_schedule_sampler(schedule_sampler_name, diffusion_steps)

    @staticmethod
    def training_samples(data, max_len, prefix_samples):
        """Every prefix of a training history and the item after it: the prefix samples themselves."""
        return prefix_samples

    @staticmethod
    def loss_units(labels):
        """What one training row weighs in the batch mean: one sample, one unit."""
        return len(labels)

    def compile_for_speed(self):
        """--compile: the approximator, in place (the state dict keeps its names)."""
        self.approximator.compile()

    @classmethod
    def from_config(cls, cfg, n_items):
        """Build from a main.py config (argparse namespace or dict)."""
        c = cfg if isinstance(cfg, dict) else vars(cfg)
        return cls(n_items, hidden_size=c['hidden_size'], num_blocks=c['num_blocks'], heads=c['heads'],
                   dropout=c['dropout'], emb_dropout=c['emb_dropout'],
                   lambda_uncertainty=c['lambda_uncertainty'], hidden_act=c['hidden_act'],
                   diffusion_steps=c['diffusion_steps'], noise_schedule=c['noise_schedule'],
                   rescale_timesteps=c['rescale_timesteps'], schedule_sampler_name=c['schedule_sampler_name'],
                   attention_mask=c['attention_mask'], rank_padding=c['rank_padding'], rounding=c['rounding'],
                   approximator=c['approximator'])

    def embed(self, seq):
        """seq (B, L) long -> h = LN(Drop(E[seq])) (B, L, d) and mask = seq > 0 (B, L)."""
        return self.embed_ln(self.embed_dropout(self.item_table(seq))), seq > 0

    def logits(self, x):
        """x (B, d) -> x E^T (B, n_items + 1); the padding column is -inf unless rank_padding."""
        logits = x @ self.item_table.weight.t()
        if not self.rank_padding:
            logits[:, 0] = float('-inf')
        return logits

    def forward(self, seq, labels):
        """Training loss. seq (B, L), labels (B,) -> (mean loss, per-sample losses (B,), timesteps (B,))."""
        h, mask = self.embed(seq)
        x_start = self.item_table(labels)  # (B, d): the raw row, no dropout or LayerNorm
        t, _ = self.sampler.sample(seq.shape[0], seq.device)
        x_t = self.diffusion.q_sample(x_start, t, torch.randn_like(x_start))
        x0_hat = self.approximator(h, x_t, self.diffusion.scale_timesteps(t), mask)
        losses = F.cross_entropy(self.logits(x0_hat).float(), labels, reduction='none')
        return losses.mean(), losses, t

    @torch.no_grad()
    def sample(self, seq, x_T=None, sample_steps=None):
        """Reverse process for a batch of histories: seq (B, L) -> x_0 (B, d).

        sample_steps K runs it over K evenly respaced of the T steps (GaussianDiffusion.respaced); None = T.
        """
        h, mask = self.embed(seq)
        diffusion = self.diffusion if sample_steps is None else self.diffusion.respaced(sample_steps)
        return diffusion.p_sample_loop(self.approximator, h, mask, x_T=x_T)

    def low_precision_copy(self, dtype=torch.bfloat16):
        """A copy for sampling whose approximator computes in `dtype` throughout (its weights too).

        Under autocast every layer casts its float32 input and output, which costs more than the bf16
        arithmetic saves on a CPU; here only the approximator's inputs and output are cast, and the reverse
        process (x_t, the schedule constants) and the scores stay float32.
        """
        model = copy.deepcopy(self)
        model.approximator = CastingApproximator(model.approximator.to(dtype), dtype)
        return model

    @torch.no_grad()
    def scores(self, seq, sample_steps=None):
        """seq (B, L) -> scores (B, n_items + 1) over every row of the item table, higher is better."""
        x0 = self.sample(seq, sample_steps=sample_steps).float()
        if self.rounding == 'inner':
            scores = self.logits(x0)
        else:  # routing: minus the squared Euclidean distance, clamped at 0 as the reference does
            table = self.item_table.weight.float()
            dist = (x0 ** 2).sum(-1, keepdim=True) + (table ** 2).sum(-1)[None] - 2.0 * x0 @ table.t()
            scores = -dist.clamp(min=0.0)
            if not self.rank_padding:
                scores[:, 0] = float('-inf')
        return scores


MODELS = {cls.name: cls for cls in (DiffuRec, SASRec)}  # the registry of --model


def model_class(name):
    """The class of --model `name`; ValueError (one line) for an unknown one."""
    if name not in MODELS:
        raise ValueError(f'unknown model {name!r}; choose one of {", ".join(MODELS)}')
    return MODELS[name]


def foreign_flags(name):
    """{flag: the class that owns it} for the flags of the other models, which --model `name` does not read."""
    return {flag: cls for cls in MODELS.values() if cls.name != name for flag in cls.own_flags}


def build_model(cfg, n_items):
    """The model named by the config's `model` (a main.py namespace, or a dict such as rundir.saved_config's)."""
    c = cfg if isinstance(cfg, dict) else vars(cfg)
    return model_class(c['model']).from_config(c, n_items)
