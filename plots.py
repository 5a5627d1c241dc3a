"""Figures: a run's training curves and a reproduction's validation curves (curves.png). matplotlib is
optional: without it nothing is drawn."""


def plot_curves(path, epoch_losses, validations, names, kept_epoch=None):
    """Training curves to a PNG at `path`: the mean training loss per epoch (left) and the validation
    metrics `names` per validation (right), the kept epoch marked. epoch_losses: one float per epoch
    (epoch 0 first); validations: dicts with 'epoch' and each name (Trainer.history).

    Draws with matplotlib's Agg backend (no display, global backend untouched). Returns False, and
    writes nothing, when matplotlib is not installed (it is optional).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(11, 4), layout='constrained')
    FigureCanvasAgg(fig)
    loss_ax, metric_ax = fig.subplots(1, 2)
    loss_ax.plot(range(len(epoch_losses)), epoch_losses, marker='.')
    loss_ax.set(xlabel='epoch', ylabel='mean training loss', title='training loss')
    epochs = [v['epoch'] for v in validations]
    for name in names:
        metric_ax.plot(epochs, [v[name] for v in validations], marker='o', label=name)
    metric_ax.set(xlabel='epoch', ylabel='percent', title='validation')
    for ax in (loss_ax, metric_ax):
        if kept_epoch is not None:
            ax.axvline(kept_epoch, color='grey', linestyle='--', linewidth=1, label=f'kept (epoch {kept_epoch})')
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    if validations:
        metric_ax.legend(fontsize='small')
    fig.savefig(path, dpi=100)
    return True


def plot_reproduction(path, runs, reference_ndcg10, reference):
    """reproduce.py's curves.png: validation NDCG@10 per epoch of every run, one subplot per dataset, the
    reference's test NDCG@10 (reference_ndcg10: {dataset: value}, named `reference`) as a horizontal line. runs: {dataset: {seed: summary}}, a
    summary holding 'status' and 'validations' (Trainer.history rows). Returns False (nothing written) without
    matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(5 * len(runs), 4), layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, (dataset, seeds) in zip(axes, runs.items()):
        for seed, summary in seeds.items():
            rows = [v for v in summary['validations'] if v.get('NDCG@10') is not None]
            if rows:
                ax.plot([v['epoch'] for v in rows], [v['NDCG@10'] for v in rows], marker='.',
                        linestyle='-' if summary['status'] == 'finished' else ':',
                        label=f'seed {seed}' + ('' if summary['status'] == 'finished' else ' (unfinished)'))
        if dataset in reference_ndcg10:
            ax.axhline(reference_ndcg10[dataset], color='black', linestyle='--', linewidth=1,
                       label=f'{reference}, test')
        ax.set(xlabel='epoch', ylabel='validation NDCG@10 (%)', title=dataset)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize='small')
    fig.savefig(path, dpi=100)
    return True
