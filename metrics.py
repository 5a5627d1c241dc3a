"""Evaluation: the one loop that scores every item for each history (validation, test, the --long_head
groups and --recommend), and the metrics computed from it: ranks, HR@K / NDCG@K, their averaging, and the
diversity of the top-K lists.
"""
import math

import torch
import torch.distributed as dist
from tqdm import tqdm

import dist_util


def metric_names(ks):
    """['HR@5', 'HR@10', 'HR@20', 'NDCG@5', ...]: the paper's column order."""
    return [f'HR@{k}' for k in ks] + [f'NDCG@{k}' for k in ks]


def label_ranks(scores, labels):
    """1-based rank of each label among its row's scores: 1 + the number of other items scoring at least
    as high, so ties count against the label. A label whose score is not finite (NaN, or -inf when it was
    excluded) ranks last.

    scores (B, N), labels (B,) -> (B,) long. The reference ranks by argsort, where the order among tied
    scores is arbitrary; this rule is the pessimistic one, so a model whose scores are all equal gets
    HR@K = 0 instead of 100.
    """
    target = scores.gather(1, labels[:, None])
    ranks = (scores >= target).sum(1)  # the label itself is counted once: 1 + the others
    return torch.where(torch.isfinite(target[:, 0]), ranks, scores.shape[1])


def rank_metrics(ranks, ks):
    """Per-row hits and discounted gains: ranks (B,) -> (B, 2 len(ks)) in metric_names(ks) order.

    HR@k = [rank <= k]; NDCG@k = [rank <= k] / log2(rank + 1) (one relevant item, so IDCG = 1).
    """
    ranks = ranks.double()[:, None]
    ks_t = torch.tensor(ks, dtype=torch.float64, device=ranks.device)[None]
    hit = (ranks <= ks_t).double()
    return torch.cat([hit, hit / torch.log2(ranks + 1)], dim=1)


def metric_sums(scores, labels, ks):
    """HR@K / NDCG@K summed over a batch: scores (B, N), labels (B,) -> (2 len(ks),) in metric_names(ks) order."""
    return rank_metrics(label_ranks(scores, labels), ks).sum(0)


def average_metrics(sums, counts, ks, metric_average='batch'):
    """Per-batch sums (n_batches, M) and row counts (n_batches,) -> {metric: percent, 4 decimals}.

    'batch' is the reference: the mean over batches of each batch's mean (the last, smaller batch
    weighs as much as a full one). 'user' is the exact mean over users.
    """
    sums, counts = sums.double(), counts.double()
    if metric_average == 'batch':
        keep = counts > 0
        values = (sums[keep] / counts[keep, None]).mean(0)
    elif metric_average == 'user':
        values = sums.sum(0) / counts.sum()
    else:
        raise ValueError(f'unknown metric_average {metric_average!r}; choose batch or user')
    return {name: round(float(v) * 100, 4) for name, v in zip(metric_names(ks), values)}


def diversity_metrics(topk, item_table, n_items, item_categories=None, chunk=4096):
    """Diversity of the top-K lists topk (U, K) long, ids 0..n_items, best first (one list per user).

    coverage@K  percent of the n_items catalogue items that appear in at least one list (the padding
                row 0, ranked only under --rank_padding, is no catalogue item and is not counted).
    ild@K       intra-list diversity: the mean over users of the mean pairwise cosine distance
                1 - cos(e_i, e_j), i < j, between the item-table rows e of the list (0..2; None when K = 1).
    With item_categories (n_items + 1, C) bool, row i marking the categories of item i:
    categories@K          mean number of distinct categories in a list;
    category_coverage@K   percent of the categories (of at least one item) that appear in some list.
    item_table (n_items + 1, d). Values rounded to 4 decimals.
    """
    n_users, k = topk.shape
    listed = torch.zeros(n_items + 1, dtype=torch.bool)
    listed[topk.flatten()] = True
    listed[0] = False
    out = {f'coverage@{k}': round(100.0 * int(listed.sum()) / n_items, 4)}
    # Sum of pairwise cosine similarities over i != j is |sum_i u_i|^2 - K for unit vectors u_i.
    unit = torch.nn.functional.normalize(item_table.detach().double().cpu(), dim=-1)
    ild_sum, categories_sum = 0.0, 0
    for rows in topk.split(chunk):
        if k > 1:
            summed = unit[rows].sum(1)  # (chunk, d)
            similarity = ((summed * summed).sum(1) - k) / (k * (k - 1))
            ild_sum += float((1.0 - similarity).sum())
        if item_categories is not None:
            categories_sum += int(item_categories[rows].any(1).sum())
    out[f'ild@{k}'] = round(ild_sum / n_users, 4) if k > 1 else None
    if item_categories is not None:
        out[f'categories@{k}'] = round(categories_sum / n_users, 4)
        present = item_categories.any(0)
        shown = item_categories[listed].any(0)
        out[f'category_coverage@{k}'] = round(100.0 * int(shown.sum()) / max(int(present.sum()), 1), 4)
    return out


def exclude_items(scores, histories):
    """Set scores[i, item] = -inf for every item of histories[i] (lists of item ids, one per row), in place."""
    rows = torch.cat([torch.full((len(h),), i, dtype=torch.long) for i, h in enumerate(histories)])
    items = torch.tensor([item for h in histories for item in h], dtype=torch.long)
    scores[rows.to(scores.device), items.to(scores.device)] = float('-inf')
    return scores


@torch.no_grad()  # not inference_mode: the caller may edit the scores in place
def score_batches(model, inputs, batch_size, device, histories=None, precision='fp32', sample_steps=None,
                  limit_batches=None, desc='eval', show_progress=True, rank=0, world=1):
    """The one evaluation loop: yields (b, rows, scores) for every batch b of inputs (N, L).

    rows: LongTensor of the input rows this process scores (its slice of batch b; a batch may leave a
    process none, and is then skipped); scores (len(rows), n_items + 1) float32 over every row of the item
    table, higher is better, with the items of histories[row] at -inf when histories (one list of item ids
    per input row) is given. precision 'bf16' scores with the model's low_precision_copy; sample_steps is
    passed to model.scores (DiffuRec's reverse steps; None = all T).
    """
    model.eval()
    if precision == 'bf16':
        model = model.low_precision_copy(torch.bfloat16)
    n_batches = math.ceil(len(inputs) / batch_size)
    if limit_batches:
        n_batches = min(n_batches, limit_batches)
    bar = tqdm(range(n_batches), desc=desc, leave=False, disable=not show_progress or rank != 0,
               dynamic_ncols=True)
    for b in bar:
        rows = torch.arange(b * batch_size, min((b + 1) * batch_size, len(inputs))).tensor_split(world)[rank]
        if len(rows) == 0:
            continue
        seq = inputs[rows.to(inputs.device)].to(device, non_blocking=True)
        scores = model.scores(seq, sample_steps=sample_steps).float()
        if histories is not None:
            exclude_items(scores, [histories[r] for r in rows.tolist()])
        yield b, rows, scores


def evaluate(model, inputs, labels, ks, batch_size, device, metric_average='batch', histories=None,
             precision='fp32', limit_batches=None, desc='eval', show_progress=True, rank=0, world=1, stop=None,
             sample_steps=None, topk_items=None):
    """HR@k and NDCG@k (percent) of `model` on inputs (N, L) -> labels (N,), in batches of batch_size.

    histories: None, or one list of item ids per row, removed from that row's ranking (--exclude_history).
    Returns None if `stop()` turns true between batches.
    topk_items: None (nothing extra is computed), or a list that receives the top-K item ids of the rows,
    K = max(ks), as LongTensors (rows, K) on the CPU, best first (for diversity_metrics). With several
    processes it ends holding one tensor with every process's rows (not in user order).

    With several processes each takes its slice of every batch; the per-batch sums are added across
    processes, so the result equals a single-process evaluation.
    """
    n_batches = math.ceil(len(labels) / batch_size)
    if limit_batches:
        n_batches = min(n_batches, limit_batches)
    sums = torch.zeros(n_batches, 2 * len(ks), dtype=torch.float64, device=device)
    counts = torch.zeros(n_batches, dtype=torch.float64, device=device)
    batches = score_batches(model, inputs, batch_size, device, histories=histories, precision=precision,
                            sample_steps=sample_steps, limit_batches=limit_batches, desc=desc,
                            show_progress=show_progress, rank=rank, world=world)
    while True:
        if stop is not None and stop():
            batches.close()
            return None
        batch = next(batches, None)
        if batch is None:
            break
        b, rows, scores = batch
        label = labels[rows.to(labels.device)].to(device, non_blocking=True)
        sums[b] = metric_sums(scores, label, ks)
        counts[b] = len(rows)
        if topk_items is not None:
            topk_items.append(scores.topk(max(ks), dim=1).indices.cpu())
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
        if topk_items is not None:
            mine = torch.cat(topk_items) if topk_items else torch.zeros(0, max(ks), dtype=torch.long)
            topk_items[:] = [dist_util.all_gather_varlen(mine.flatten().to(device)).view(-1, max(ks)).cpu()]
    return average_metrics(sums.cpu(), counts.cpu(), ks, metric_average)


def format_metrics(metrics):
    return '  '.join(f'{k} {v:.4f}' for k, v in metrics.items())


def metrics_table(rows):
    """rows: {label: {metric: value}} -> a text table in the paper's layout (one row per label)."""
    names = list(next(iter(rows.values())).keys())
    width = max(len(label) for label in rows) + 2
    lines = [''.ljust(width) + ''.join(n.rjust(10) for n in names)]
    for label, metrics in rows.items():
        lines.append(label.ljust(width) + ''.join(f'{metrics[n]:10.4f}' for n in names))
    return '\n'.join(lines)
