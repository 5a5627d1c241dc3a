"""SASRec (Kang & McAuley, ICDM 2018) trained with softmax cross-entropy: the baseline beside DiffuRec.

A causal self-attention transformer reads a user's history and predicts the next item at every position;
the output layer is the item table itself (scores = h E^T). Following Klenitskiy & Vasilev (RecSys 2023),
training uses cross-entropy over all items at every real position of each user's training sequence, instead
of the original binary cross-entropy with one sampled negative; `--loss sampled` takes the softmax over the
target and `--negatives` items drawn uniformly instead (the sampled softmax of the eSASRec benchmark's SASRec
row). Evaluation goes through the same scoring interface as DiffuRec, so both models are ranked by one
evaluation loop.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import sequence_samples
from diffurec import Dropout, TransformerBlock, attention_mask, linear


class SASRec(nn.Module):
    """SASRec over n_items items (ids 1..n_items, 0 = padding); the item table has n_items + 1 rows.

    Embedding: E[seq] sqrt(d) + P (learned positions, numbered as `padding` says: hidden()), dropout, padding
    positions zeroed. Blocks (block 'preln'): pre-LN self-attention and feed-forward with residuals, each
    position attending only to itself and the real items before it (causal and key mask); block 'original':
    OriginalBlock. A final LayerNorm gives the hidden state h (B, L, d). init 'xavier' (Xavier-normal tables,
    feed-forward and attention output, PyTorch's defaults elsewhere) or 'normal' (normal_init).
    rank_padding as in DiffuRec: whether the padding row takes part in the softmax and the ranking.
    """

    name, title = 'sasrec', 'SASRec'
    # The defaults from the literature (docs/sasrec.md gives the sources), for every flag not given. Its
    # validation is one forward pass per user, cheap enough to run often.
    preset = dict(hidden_size=64, num_blocks=2, heads=1, dropout=0.2, emb_dropout=0.2, hidden_act='relu',
                  batch_size=128, epochs=200, eval_interval=2, patience=5)
    # --preset published: the configuration published for a dataset, over the preset (docs/sasrec.md gives
    # the sources). Patience counts validations, so a validation every epoch makes it a count of epochs. Both
    # sources leave the user's history out of validation and test, and stop on and keep one metric.
    _esasrec_benchmark = dict(num_blocks=1, eval_interval=1, patience=50, exclude_history=True, select_metric='HR@10')
    published_presets = {
        'amazon_beauty': _esasrec_benchmark,
        'toys': _esasrec_benchmark,
        'ml-1m': dict(num_blocks=2, dropout=0.1, emb_dropout=0.1, max_len=200, epochs=100, eval_interval=1,
                      patience=10, exclude_history=True, select_metric='NDCG@10'),
    }
    own_flags = ('preset', 'loss', 'negatives', 'inner_size', 'block', 'padding', 'init')
    losses = ('full', 'sampled')
    block_kinds = ('preln', 'original')
    paddings = ('left', 'right')
    inits = ('xavier', 'normal')
    sampler = None  # no timesteps

    def __init__(self, n_items, max_len=50, hidden_size=64, num_blocks=2, heads=1, dropout=0.2,
                 emb_dropout=0.2, hidden_act='relu', rank_padding=True, loss='full', negatives=256, inner_size=None,
                 block='preln', padding='left', init='xavier'):
        super().__init__()
        for name, value, choices in (('loss', loss, self.losses), ('block', block, self.block_kinds),
                                     ('padding', padding, self.paddings), ('init', init, self.inits)):
            if value not in choices:
                raise ValueError(f'unknown {name} {value!r}; choose one of {", ".join(choices)}')
        self.block, self.padding = block, padding
        self.n_items = n_items
        self.loss, self.negatives = loss, negatives
        self.max_len = max_len
        self.rank_padding = rank_padding
        self.item_table = nn.Embedding(n_items + 1, hidden_size)
        self.position_table = nn.Embedding(max_len, hidden_size)
        nn.init.xavier_normal_(self.item_table.weight)
        nn.init.xavier_normal_(self.position_table.weight)
        self.embed_dropout = Dropout(emb_dropout)
        Block = OriginalBlock if block == 'original' else TransformerBlock
        self.blocks = nn.ModuleList(Block(hidden_size, heads, dropout, hidden_act, inner_size)
                                    for _ in range(num_blocks))
        self.out_ln = nn.LayerNorm(hidden_size, eps=1e-12)
        if init == 'normal':
            self.apply(normal_init)
            with torch.no_grad():
                self.item_table.weight[0].zero_()
        self.block_dtype = None  # set by low_precision_copy

    @classmethod
    def from_config(cls, cfg, n_items):
        """Build from a main.py config (argparse namespace or dict)."""
        c = cfg if isinstance(cfg, dict) else vars(cfg)
        return cls(n_items, max_len=c['max_len'], hidden_size=c['hidden_size'], num_blocks=c['num_blocks'],
                   heads=c['heads'], dropout=c['dropout'], emb_dropout=c['emb_dropout'],
                   hidden_act=c['hidden_act'], rank_padding=c['rank_padding'], loss=c['loss'],
                   negatives=c['negatives'], inner_size=c['inner_size'], block=c['block'],
                   padding=c['padding'], init=c['init'])

    @staticmethod
    def training_samples(data, max_len, prefix_samples):
        """One row per user: the whole training history, a target at every position at once."""
        return sequence_samples(data, max_len)

    def compile_for_speed(self):
        """--compile: nothing is compiled for SASRec (its step is a few products)."""

    @staticmethod
    def loss_units(targets):
        """What one training row weighs in the batch mean: its number of real target positions."""
        return (targets > 0).sum()

    def hidden(self, seq, last_only=False):
        """seq (B, L) long, left-padded -> h (B, L, d), or (B, 1, d) of the last position with last_only.

        padding 'left': the last position takes the last row of the position table, and the original block
        attends to the (zeroed) padding positions too. padding 'right': what the same items right-padded give
        (the layout of Klenitskiy & Vasilev's code and RecBole's), computed on the left-padded batch: each
        user's first item takes row 0, and no padding position is ever a key.
        """
        L = seq.shape[1]
        if L > self.max_len:
            raise ValueError(f'sequences of length {L} exceed the {self.max_len} learned positions')
        mask = seq > 0
        if self.padding == 'right':
            positions = self.position_table((mask.cumsum(1) - 1).clamp(min=0))
        else:
            positions = self.position_table.weight[-L:]
        x = self.item_table(seq) * math.sqrt(self.item_table.embedding_dim) + positions
        x = self.embed_dropout(x) * mask.unsqueeze(-1).to(x.dtype)
        if self.block_dtype is not None:
            x = x.to(self.block_dtype)
        # the original block zeroes the padding positions after every block
        keep = mask.unsqueeze(-1).to(x.dtype) if self.block == 'original' else None
        if self.block == 'original' and self.padding == 'left':  # a causal mask only: padding keys not masked
            allowed = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()[None, None]
        else:
            _, allowed = attention_mask(mask, 'causal')
        for i, block in enumerate(self.blocks):
            last = last_only and i == len(self.blocks) - 1
            x = block(x, attn_mask=allowed, last_only=last)
            if keep is not None:
                x = x * (keep[:, -1:] if last else keep)
        return self.out_ln(x)

    def logits(self, h):
        """h (P, d) -> h E^T (P, n_items + 1) in float32; the padding column is -inf unless rank_padding."""
        logits = h.float() @ self.item_table.weight.float().t()
        if not self.rank_padding:
            logits[:, 0] = float('-inf')
        return logits

    def sampled_logits(self, h, targets, negatives):
        """h (P, d), targets (P,), negatives (P, N) -> float32 scores (P, 1 + N) of [target, negatives...].

        A negative equal to the target is scored as any other (the sampled softmax of the eSASRec benchmark
        keeps such accidental hits too)."""
        candidates = torch.cat([targets[:, None], negatives], dim=1)
        rows = F.embedding(candidates, self.item_table.weight).float()  # (P, 1 + N, d)
        return torch.bmm(rows, h.float()[:, :, None]).squeeze(-1)

    def draw_negatives(self, count, device):
        """`negatives` item ids per target, uniform over the real items 1..n_items (never padding): (count, N)."""
        return torch.randint(1, self.n_items + 1, (count, self.negatives), device=device)

    def forward(self, seq, targets):
        """Training loss. seq, targets (B, L) -> (mean loss over real positions, per-row loss sums (B,), None).

        Only the real target positions (targets > 0) reach the item-table product and the loss: the softmax
        over every item (loss 'full'), or over the target and `negatives` uniform draws (loss 'sampled').
        """
        real = targets > 0
        h = self.hidden(seq)[real]  # (P, d)
        labels = targets[real]
        if self.loss == 'sampled':
            logits = self.sampled_logits(h, labels, self.draw_negatives(len(labels), labels.device))
            labels = torch.zeros_like(labels)  # the target is column 0
        else:
            logits = self.logits(h)
        losses = F.cross_entropy(logits, labels, reduction='none')  # (P,)
        rows = real.nonzero()[:, 0]
        per_row = torch.zeros(seq.shape[0], dtype=losses.dtype, device=seq.device).index_add_(0, rows, losses)
        return losses.mean(), per_row, None

    @torch.no_grad()
    def scores(self, seq, sample_steps=None):
        """seq (B, L) -> scores (B, n_items + 1) of the item after the last one, higher is better.

        sample_steps is DiffuRec's and has no meaning here (accepted so that both models score alike).
        """
        return self.logits(self.hidden(seq, last_only=True)[:, -1])

    def low_precision_copy(self, dtype=torch.bfloat16):
        """A copy whose blocks compute in `dtype`; the embedding stage and the item-table product stay float32
        (fewer ties among the scores)."""
        model = copy.deepcopy(self)
        model.blocks.to(dtype)
        model.out_ln.to(dtype)
        model.block_dtype = dtype
        return model


def normal_init(module):
    """init 'normal', the initialisation of Klenitskiy & Vasilev's SASRec (and RecBole's): every linear layer's
    weight and every embedding from N(0, 0.02^2), biases zero (LayerNorm keeps its construction's one and zero)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class OriginalBlock(TransformerBlock):
    """The block of SASRec's original code, as its PyTorch port (SASRec.pytorch) writes it and the code behind
    the published presets' anchors adapts it (docs/sasrec.md): x (B, L, d) -> (B, L, d), or (B, 1, d) with
    last_only.

        q = LN1(x);  a = q + MHA(queries q, keys and values x);  y = LN2(a);  out = y + Drop(W2 Drop(act(W1 y)))

    The residuals start from the normalised input, not from x as in a pre-LN block; the attention weights are
    dropped out, its output is not. The model zeroes the padding positions after every block and masks no
    padding key (the port passes the causal mask only). The feed-forward is d -> inner_size -> d (4 d when
    None; the original keeps d). The layers are TransformerBlock's; only their order differs.
    """

    def forward(self, x, attn_mask=None, last_only=False):
        q = self.ln_attn(x)
        a = self.attn(x, attn_mask=attn_mask, last_only=last_only, residual=q[:, -1:] if last_only else q, query=q)
        y = self.ln_ffn(a)
        hidden = self.dropout(linear(self.w1, y, self.hidden_act))
        if self.training:
            return y + self.dropout(self.w2(hidden))
        return linear(self.w2, hidden, residual=y)
