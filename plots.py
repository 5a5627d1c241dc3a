"""Figures of a run: the training curves (curves.png). matplotlib is optional: without it nothing is drawn."""


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
