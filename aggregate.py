"""Test results over seeds: every metric's mean and sample standard deviation, as JSON and as text.

Used by `main.py --seeds` (aggregate.json) and by reproduce.py's table.
"""
import math


def aggregate_results(per_seed):
    """{seed: results of run()} -> aggregate.json: every test metric and diversity value over the seeds.

    Per metric: mean, std (sample standard deviation, n - 1; None for one seed), values (in seed order).
    """
    seeds = list(per_seed)
    flat = [flat_results(r) for r in per_seed.values()]
    metrics = {}
    for name in flat[0]:
        values = [r[name] for r in flat]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        metrics[name] = {'mean': round(mean, 4), 'std': None if std is None else round(std, 4), 'values': values}
    return {'dataset': per_seed[seeds[0]]['dataset'], 'seeds': seeds, 'std': 'sample standard deviation (n - 1)',
            'metrics': metrics}


# --test_both_protocols: the test metrics under each history protocol, named with this prefix
PROTOCOLS = {'test_history_ranked': 'history ranked', 'test_history_excluded': 'history excluded'}


def flat_results(results):
    """{name: value} of one run's test metrics, its --test_both_protocols rows (prefixed) and diversity values."""
    flat = dict(results['test'])
    for key, prefix in PROTOCOLS.items():
        flat.update({f'{prefix} {name}': v for name, v in results.get(key, {}).items()})
    flat.update({name: v for name, v in results['diversity'].items() if v is not None})
    return flat


def aggregate_table(aggregate):
    """The aggregate as text: one line per metric, mean +- std over the seeds."""
    n = len(aggregate['seeds'])
    lines = [f'{aggregate["dataset"]}, {n} seed(s) {" ".join(map(str, aggregate["seeds"]))}: mean +- std (n - 1)']
    for name, m in aggregate['metrics'].items():
        std = 'n/a' if m['std'] is None else f'{m["std"]:.4f}'
        lines.append(f'{name:>26}  {m["mean"]:10.4f} +- {std}')
    return '\n'.join(lines)
