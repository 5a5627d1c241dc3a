"""Draw the DiffuRec framework figure: asset/diffurec_framework.png.

    python asset/framework.py [--out PATH]

Pure matplotlib (boxes, arrows, text) on the Agg backend. The drawing is deterministic: the same
matplotlib version writes the same bytes (the PNG carries no software or date stamp).
The upper panel is one training step, the lower one inference by the reverse process.
"""
import argparse
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

DEFAULT_OUT = Path(__file__).resolve().parent / 'diffurec_framework.png'
WIDTH_IN, HEIGHT_IN, DPI = 14.0, 10.0, 100  # 1400 x 1000 px; the axes use inches as data units

# one colour per role: input, embedding, diffusion, approximator, output
COLOURS = {
    'input': ('#eeeeee', '#555555'),
    'embed': ('#dbe9f6', '#2c6aa0'),
    'diffuse': ('#fde3cf', '#c0601a'),
    'approx': ('#dcefd9', '#2e7d32'),
    'output': ('#e8def3', '#6a3d9a'),
}
FONT = 12.5   # box text, points at the saved size
SMALL = 11.5  # arrow labels and notes: the smallest text in the figure


def box(ax, x, y, w, h, text, role, size=FONT, weight='normal'):
    """A rounded box centred at (x, y), w x h inches; returns its edges for attaching arrows."""
    face, edge = COLOURS[role]
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle='round,pad=0,rounding_size=0.12',
                                fc=face, ec=edge, lw=1.6, zorder=2))
    ax.text(x, y, text, ha='center', va='center', fontsize=size, weight=weight, zorder=3, linespacing=1.35)
    return {'l': x - w / 2, 'r': x + w / 2, 'b': y - h / 2, 't': y + h / 2, 'x': x, 'y': y}


def arrow(ax, start, end, label=None, label_xy=None, style='-|>', ls='-', colour='#333333', conn=None,
          ha='center', va='bottom'):
    """An arrow from start to end (inch coordinates), optionally with a label at label_xy
    (default: just above the middle of the arrow)."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=16, lw=1.6, color=colour,
                                 linestyle=ls, connectionstyle=conn or 'arc3', shrinkA=0, shrinkB=0, zorder=1))
    if label:
        if label_xy is None:
            label_xy = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.05)
        ax.text(*label_xy, label, ha=ha, va=va, fontsize=SMALL, zorder=3)


def polyline(ax, points, colour='#333333', ls='-'):
    """Line segments through points, the last one ending in an arrow head."""
    xs, ys = zip(*points[:-1])
    ax.plot(xs, ys, color=colour, lw=1.6, ls=ls, zorder=1, solid_capstyle='butt')
    arrow(ax, points[-2], points[-1], colour=colour, ls=ls)


def panel(ax, x0, y0, x1, y1, title):
    """A light frame with a bold title in its top-left corner."""
    ax.add_patch(FancyBboxPatch((x0, y0), x1 - x0, y1 - y0, boxstyle='round,pad=0,rounding_size=0.18',
                                fc='#fafafa', ec='#9a9a9a', lw=1.2, zorder=0))
    ax.text(x0 + 0.2, y1 - 0.15, title, ha='left', va='top', fontsize=14, weight='bold')


def draw_training(ax):
    """Upper panel: one training step, from the history and the target item to the loss."""
    panel(ax, 0.15, 4.65, 13.85, 9.45, 'Training: one step')
    ya, yb, yc = 8.35, 6.85, 5.45  # rows: history, target, timestep

    hist = box(ax, 1.15, ya, 1.8, 0.95, 'History $s$\nitem ids $i_1 \\ldots i_L$', 'input')
    target = box(ax, 1.15, yb, 1.8, 0.95, 'Target item\n$i_{L+1}$', 'input')
    step = box(ax, 1.15, yc, 1.8, 0.85, 'Timestep\n$t \\sim$ sampler', 'input')

    table = box(ax, 3.2, (ya + yb) / 2, 1.35, 2.45, 'Item\ntable $E$\n$(n+1)\\times d$', 'embed',
                weight='bold')
    ax.text(table['x'], table['b'] + 0.45, 'shared with\nrounding', ha='center', va='center',
            fontsize=SMALL, style='italic', zorder=3)
    arrow(ax, (hist['r'], ya), (table['l'], ya))
    arrow(ax, (target['r'], yb), (table['l'], yb))

    norm = box(ax, 5.7, ya, 2.3, 0.95, 'Emb. dropout (0.3)\n+ LayerNorm', 'embed')
    arrow(ax, (table['r'], ya), (norm['l'], ya), '$E[s]$')
    fwd = box(ax, 5.7, yb, 2.3, 1.25, '$\\bf{Forward}$ $q(x_t \\mid x_0)$\n'
              '$x_t = \\sqrt{\\bar\\alpha_t}\\,x_0 + \\sqrt{1-\\bar\\alpha_t}\\,\\epsilon$',
              'diffuse')
    arrow(ax, (table['r'], yb), (fwd['l'], yb), '$x_0$')
    time = box(ax, 5.7, yc, 2.3, 0.85, 'Time embedding\nsinusoid + MLP', 'diffuse')
    arrow(ax, (step['r'], yc), (time['l'], yc), '$t$', label_xy=(2.28, yc + 0.05))
    # t also sets the noise level of q: branch off the timestep arrow and enter q from below
    ax.plot([2.5], [yc], 'o', color='#333333', ms=5, zorder=3)
    polyline(ax, [(2.5, yc), (2.5, 6.05), (fwd['x'] - 0.7, 6.05), (fwd['x'] - 0.7, fwd['b'])])

    mix = box(ax, 8.85, 6.9, 1.8, 3.5,
              'Noisy input\n\n$z = x_t + \\mathrm{TE}(t)$\n$u = h + \\lambda \\odot z$\n\n'
              '$\\lambda \\sim \\mathcal{N}(\\delta, \\delta^2)$\nper element', 'diffuse')
    mid = (norm['r'] + mix['l']) / 2
    arrow(ax, (norm['r'], ya), (mix['l'], ya), '$h$', label_xy=(mid, ya + 0.05))
    ax.text(mid, ya - 0.08, '$B{\\times}L{\\times}d$', ha='center', va='top', fontsize=SMALL)
    arrow(ax, (fwd['r'], yb), (mix['l'], yb), '$x_t$', label_xy=(mid, yb + 0.05))
    ax.text(mid, yb - 0.08, '$B{\\times}d$', ha='center', va='top', fontsize=SMALL)
    arrow(ax, (time['r'], yc), (mix['l'], yc), '$\\mathrm{TE}(t)$', label_xy=(mid, yc + 0.05))

    approx = box(ax, 12.05, ya, 3.2, 1.15, 'Approximator $f(h, x_t, t)$\n4 transformer blocks, LayerNorm',
                 'approx')
    arrow(ax, (mix['r'], ya), (approx['l'], ya), '$u$')
    ax.text(approx['x'], approx['b'] - 0.08, 'last position', ha='center', va='top', fontsize=SMALL,
            style='italic')
    rounding = box(ax, 12.05, yb - 0.15, 3.2, 0.95, 'Rounding: scores = $\\hat{x}_0 E^\\top$\n'
                   '(inner product, all items)', 'output')
    arrow(ax, (approx['x'] + 0.85, approx['b']), (approx['x'] + 0.85, rounding['t']), '$\\hat{x}_0$',
          label_xy=(approx['x'] + 0.95, (approx['b'] + rounding['t']) / 2), ha='left', va='center')
    loss = box(ax, 12.05, yc - 0.05, 3.2, 0.8, 'Loss: cross-entropy\n(scores, target $i_{L+1}$)', 'output')
    arrow(ax, (rounding['x'], rounding['b']), (rounding['x'], loss['t']))


def draw_inference(ax):
    """Lower panel: the reverse process from pure noise, one of its steps in detail, and the ranking."""
    panel(ax, 0.15, 0.2, 13.85, 4.45, 'Inference: reverse process, t = T-1 ... 0')
    yc = 3.45  # the chain of latents
    chain = [(1.2, '$x_T \\sim \\mathcal{N}(0, I)$', 1.9), (3.0, '$x_{T-1}$', 0.9), (4.1, '$\\cdots$', 0.0),
             (5.3, '$x_t$', 0.8), (8.0, '$x_{t-1}$', 0.9), (9.2, '$\\cdots$', 0.0), (10.3, '$x_0$', 0.8)]
    nodes = []
    for x, text, w in chain:
        if w:
            nodes.append(box(ax, x, yc, w, 0.65, text, 'diffuse', size=13))
        else:
            ax.text(x, yc, text, ha='center', va='center', fontsize=16)
            nodes.append({'l': x - 0.25, 'r': x + 0.25})
    for left, right in zip(nodes, nodes[1:]):
        arrow(ax, (left['r'], yc), (right['l'], yc))
    x_t, x_prev = nodes[3], nodes[4]
    ax.text((x_t['r'] + x_prev['l']) / 2, yc + 0.08, '$p_\\theta(x_{t-1} \\mid x_t)$', ha='center',
            va='bottom', fontsize=SMALL)
    ranking = box(ax, 12.55, yc, 2.3, 1.2, 'Rounding:\nscores = $x_0 E^\\top$\n$\\to$ top-K ranking', 'output')
    arrow(ax, (nodes[-1]['r'], yc), (ranking['l'], yc))

    # one reverse step x_t -> x_{t-1} in detail
    yd, ybus = 1.25, 2.3
    ax.text(0.35, 2.3, 'one step in detail:', ha='left', va='center', fontsize=SMALL, style='italic')
    hist = box(ax, 1.2, yd, 1.9, 0.95, 'History $s$\n$\\to$ $E$, LayerNorm', 'embed')
    ax.text(hist['x'], hist['b'] - 0.06, 'no dropout', ha='center', va='top', fontsize=SMALL, style='italic')
    approx = box(ax, 4.1, yd, 2.6, 0.95, 'Approximator\n$\\hat{x}_0 = f(h, x_t, t)$', 'approx')
    arrow(ax, (hist['r'], yd), (approx['l'], yd), '$h$')
    ax.text(approx['x'], approx['b'] - 0.06, 'fresh $\\lambda$ at every step', ha='center', va='top',
            fontsize=SMALL, style='italic')
    post = box(ax, 8.9, yd, 3.8, 1.15,
               '$\\mu = c_1(t)\\,\\hat{x}_0 + c_2(t)\\,x_t$\n'
               '$x_{t-1} = \\mu + [t>0]\\,\\sigma_t\\,\\epsilon$', 'diffuse')
    arrow(ax, (approx['r'], yd), (post['l'], yd), '$\\hat{x}_0$')
    # x_t feeds the approximator and the posterior mean; the step's output is the next latent
    ax.plot([x_t['x'], x_t['x']], [x_t['b'], ybus], color='#333333', lw=1.6, zorder=1)
    polyline(ax, [(x_t['x'], ybus), (approx['x'], ybus), (approx['x'], approx['t'])])
    polyline(ax, [(x_t['x'], ybus), (post['l'] + 0.3, ybus), (post['l'] + 0.3, post['t'])])
    ax.text(x_t['x'] + 0.1, 2.7, '$x_t$', ha='left', va='center', fontsize=SMALL + 1)
    arrow(ax, (x_prev['x'], post['t']), (x_prev['x'], x_prev['b']), '$x_{t-1}$',
          label_xy=(x_prev['x'] + 0.1, 2.5), ha='left', va='center')
    ax.text(post['r'] + 0.15, yd, 'at $t = 0$:\n$x_0 = \\hat{x}_0$', ha='left', va='center', fontsize=SMALL)


def draw(path=DEFAULT_OUT):
    """Draw the figure and save it as a PNG at `path` (1400 x 1000 px); returns the path."""
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)  # no pyplot: the global backend stays as it was
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, WIDTH_IN)
    ax.set_ylim(0, HEIGHT_IN)
    ax.axis('off')
    ax.text(WIDTH_IN / 2, 9.75, 'DiffuRec: diffusing the target item embedding, conditioned on the history',
            ha='center', va='center', fontsize=16, weight='bold')
    draw_training(ax)
    draw_inference(ax)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # no Software stamp: the bytes then depend on the drawing, not on the installed version string
    fig.savefig(path, dpi=DPI, facecolor='white', metadata={'Software': None})
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description='Draw the DiffuRec framework figure.', allow_abbrev=False)
    parser.add_argument('--out', default=str(DEFAULT_OUT), help=f'PNG to write (default {DEFAULT_OUT.name} '
                        'next to this script)')
    args = parser.parse_args(argv)
    print(draw(args.out))


if __name__ == '__main__':
    main()
