"""Test results over seeds: every metric's mean and sample standard deviation, as JSON and as text.

Used by `main.py --seeds` (aggregate.json) and by reproduce.py's table.
"""
import math


def aggregate_results(per_seed):
    """{seed: results of run()} -> aggregate.json: every test metric and diversity value over the seeds.

    Per metric: mean, std (sample standard deviation, n - 1; None for one seed), values (in seed order).
    """
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    names = list(first['test']) + [k for k, v in first['diversity'].items() if v is not None]
    metrics = {}
    for name in names:
        values = [r['test'][name] if name in r['test'] else r['diversity'][name] for r in per_seed.values()]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        metrics[name] = {'mean': round(mean, 4), 'std': None if std is None else round(std, 4), 'values': values}
    return {'dataset': first['dataset'], 'seeds': seeds, 'std': 'sample standard deviation (n - 1)',
            'metrics': metrics}


def aggregate_table(aggregate):
    """The aggregate as text: one line per metric, mean +- std over the seeds."""
    n = len(aggregate['seeds'])
    lines = [f'{aggregate["dataset"]}, {n} seed(s) {" ".join(map(str, aggregate["seeds"]))}: mean +- std (n - 1)']
    for name, m in aggregate['metrics'].items():
        std = 'n/a' if m['std'] is None else f'{m["std"]:.4f}'
        lines.append(f'{name:>22}  {m["mean"]:10.4f} +- {std}')
    return '\n'.join(lines)
