"""Benchmark: time training steps and evaluation batches of DiffuRec on a dataset and config.

    python bench.py --dataset amazon_beauty --steps 10 --eval_batches 2
    python bench.py --dataset amazon_beauty --precision bf16 --json bench.json
    python bench.py --dataset amazon_beauty --compare      # also time the plain spec implementation

Takes every model flag of main.py. A training step is forward, backward and optimizer step on a batch of
`--batch_size` training samples; an evaluation batch is the full reverse process (T steps) and the
scoring of `--batch_size` validation users. Times are medians over the measured steps, after warm-up.
"""
import json
import os
import resource
import statistics
import sys
import time

import torch

import utils
from main import build_parser, check_config
from model import DiffuRec
from trainer import autocast

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tests'))


def parse_args(argv=None):
    parser = build_parser()
    parser.description = 'Time DiffuRec training steps and evaluation batches.'
    bench = parser.add_argument_group('benchmark')
    bench.add_argument('--steps', type=int, default=10, help='training steps to time')
    bench.add_argument('--eval_batches', type=int, default=2, help='evaluation batches to time')
    bench.add_argument('--warmup', type=int, default=2, help='untimed steps (and batches) first')
    bench.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s)')
    bench.add_argument('--compare', action='store_true', help='also time the plain spec implementation')
    bench.add_argument('--json', default=None, metavar='PATH', help='also write the figures as JSON')
    return parser.parse_args(argv)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, n, warmup, device):
    """Seconds of each of n calls of fn after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def summary(times, batch):
    med = statistics.median(times)
    return {'median_ms': round(med * 1000, 2), 'min_ms': round(min(times) * 1000, 2),
            'max_ms': round(max(times) * 1000, 2), 'samples_per_s': round(batch / med, 1), 'n': len(times)}


def peak_memory_mb(device):
    if device.type == 'cuda':
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # whole process, KiB -> MiB


def bench_model(name, model, samples, cfg, device, precision, plain=None):
    """Time training steps and evaluation batches of `model` (or of its plain re-implementation)."""
    train_x, train_y = samples['train']
    val_x, val_y = samples['val']
    B = cfg.batch_size
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(train_y), (B,), generator=g) for _ in range(8)]
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    runner = plain if plain is not None else model
    state = {'i': 0}

    def train_step():
        rows = batches[state['i'] % len(batches)].to(device)
        state['i'] += 1
        runner.train()
        with autocast(device, precision):
            out = runner(train_x[rows], train_y[rows])
        loss = out[0] if isinstance(out, tuple) else out
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    eval_rows = torch.arange(min(B, len(val_y)), device=device)
    # Evaluation as trainer.evaluate runs it: with bf16, a copy whose approximator computes in bf16.
    scorer = model.low_precision_copy() if precision == 'bf16' and plain is None else runner

    @torch.inference_mode()
    def eval_batch():
        scorer.eval()
        scorer.scores(val_x[eval_rows])

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    train = summary(timed(train_step, cfg.steps, cfg.warmup, device), B)
    evaluation = summary(timed(eval_batch, cfg.eval_batches, min(cfg.warmup, 1), device), len(eval_rows))
    return {'name': name, 'precision': precision, 'train_step': train, 'eval_batch': evaluation,
            'peak_memory_mb': peak_memory_mb(device)}


def table(rows):
    head = f'{"implementation":24s}{"precision":>10s}{"train ms/step":>15s}{"(min-max)":>17s}{"samples/s":>11s}' \
           f'{"eval ms/batch":>15s}{"(min-max)":>19s}{"users/s":>9s}{"peak MiB":>10s}'
    lines = [head]
    for r in rows:
        t, e = r['train_step'], r['eval_batch']
        lines.append(f'{r["name"]:24s}{r["precision"]:>10s}{t["median_ms"]:15.1f}{span(t):>17s}'
                     f'{t["samples_per_s"]:11.0f}{e["median_ms"]:15.1f}{span(e):>19s}{e["samples_per_s"]:9.0f}'
                     f'{r["peak_memory_mb"]:10.0f}')
    return '\n'.join(lines)


def span(s):
    return f'{s["min_ms"]:.0f}-{s["max_ms"]:.0f}'


def main(argv=None):
    cfg = parse_args(argv)
    try:
        check_config(cfg)
        device = utils.choose_device(cfg.device)
        data = utils.load_dataset(cfg.dataset, cfg.data_dir)
    except (ValueError, utils.DataError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    utils.set_seed(cfg.random_seed)
    samples = {k: (x.to(device), y.to(device)) for k, (x, y) in utils.build_samples(data, cfg.max_len).items()}
    n_items = len(data['smap'])
    model = DiffuRec.from_config(cfg, n_items).to(device)
    if cfg.compile:
        model.approximator.compile()
    rows = [bench_model('fast (model.py)', model, samples, cfg, device, cfg.precision)]
    if cfg.compare:
        from spec_reference import PlainDiffuRec
        utils.set_seed(cfg.random_seed)
        reference = DiffuRec.from_config(cfg, n_items).to(device)
        plain = PlainDiffuRec(reference, cfg.dropout, cfg.emb_dropout)
        rows.append(bench_model('plain spec (reference)', reference, samples, cfg, device, 'fp32', plain=plain))
    print(f'DiffuRec benchmark: {cfg.dataset}, batch {cfg.batch_size}, T {cfg.diffusion_steps}, '
          f'd {cfg.hidden_size}, {cfg.num_blocks} blocks; device {device}; torch {torch.__version__}; '
          f'{torch.get_num_threads()} threads')
    print(table(rows))
    report = {'dataset': cfg.dataset, 'device': str(device),
              'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
              'threads': torch.get_num_threads(), 'torch_version': torch.__version__, 'compile': cfg.compile,
              'config': utils.config_dict(cfg), 'results': rows}
    if cfg.compare:
        fast, ref = rows
        report['speedup'] = {
            'train': round(ref['train_step']['median_ms'] / fast['train_step']['median_ms'], 2),
            'eval': round(ref['eval_batch']['median_ms'] / fast['eval_batch']['median_ms'], 2)}
        print(f'speed-up over the plain implementation: training x{report["speedup"]["train"]}, '
              f'evaluation x{report["speedup"]["eval"]}')
    if cfg.json:
        with open(cfg.json, 'w') as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
