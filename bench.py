"""Benchmark: time training steps and evaluation batches of DiffuRec (or SASRec) on a dataset and config.

    python bench.py --dataset amazon_beauty --steps 10 --eval_batches 2
    python bench.py --model sasrec --dataset toys --precision bf16   # SASRec with its defaults
    python bench.py --dataset amazon_beauty --precision bf16 --json bench.json
    python bench.py --dataset amazon_beauty --compare      # also time the plain spec implementation
    python bench.py --dataset amazon_beauty --profile 15   # and the 15 costliest operators of each

Takes every model flag of main.py. A training step is forward, backward and optimizer step on a batch of
`--batch_size` training samples (SASRec: user sequences); an evaluation batch is the full reverse process
(T steps) and the scoring of `--batch_size` validation users. With the number of batches of an epoch, the
median step also gives the training time of an epoch. Times are medians over the measured steps, after warm-up.
It also measures what bounds them on this machine: the rate of the model's matrix products in fp32 and bf16
and of the random number generator, and the time the matrix products alone would take at those rates.
"""
import resource
import statistics
import sys
import time

import torch

import cli
import utils
from data import DataError, build_samples, load_dataset
from config import build_parser, check_config, given_flags, set_presets
from model import DiffuRec, build_model, model_class
from trainer import precision_context


# main.py's flags that make or read a run: bench.py writes no run, so given they are an error, not ignored.
NOT_BENCHED_GROUPS = ('run', 'recommendations from a trained run')
NOT_BENCHED = {'category_file'}


def bench_parser():
    """main.py's parser and the benchmark's own flags."""
    parser = build_parser()
    parser.prog = 'bench.py'
    parser.description = 'Time DiffuRec (or SASRec) training steps and evaluation batches.'
    bench = parser.add_argument_group('benchmark')
    bench.add_argument('--steps', type=cli.positive_int, default=10, help='training steps to time')
    bench.add_argument('--eval_batches', type=cli.positive_int, default=2, help='evaluation batches to time')
    bench.add_argument('--warmup', type=cli.non_negative_int, default=2, help='untimed steps (and batches) first')
    bench.add_argument('--threads', type=cli.positive_int, default=None,
                       help='torch CPU threads (default: torch\'s)')
    bench.add_argument('--compare', action='store_true', help='also time the plain spec implementation')
    bench.add_argument('--json', default=None, metavar='PATH', help='also write the figures as JSON')
    bench.add_argument('--profile', type=cli.non_negative_int, default=0, metavar='N',
                       help='also profile one training step and one evaluation batch: their N costliest operators')
    return parser


def parse_args(argv=None):
    parser = bench_parser()
    unused = NOT_BENCHED | {a.dest for g in parser._action_groups if g.title in NOT_BENCHED_GROUPS
                            for a in g._group_actions if a.dest != 'device'}
    cfg = set_presets(parser, argv).parse_args(argv)
    misplaced = sorted(given_flags(parser, argv) & unused)
    if misplaced:
        raise ValueError(f'--{misplaced[0]} does not apply to bench.py (it times steps and writes no run); '
                         f'drop it')
    cli.check_not_empty(parser, cfg)
    return cfg


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


def make_steps(model, samples, cfg, device, precision, plain=None):
    """A training step and an evaluation batch of `model` (or of its plain re-implementation), as closures."""
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
        with precision_context(device, precision):
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

    return train_step, eval_batch, len(eval_rows)


def bench_model(name, model, samples, cfg, device, precision, plain=None):
    """Time training steps and evaluation batches of `model` (or of its plain re-implementation)."""
    train_step, eval_batch, users = make_steps(model, samples, cfg, device, precision, plain)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    train = summary(timed(train_step, cfg.steps, cfg.warmup, device), cfg.batch_size)
    evaluation = summary(timed(eval_batch, cfg.eval_batches, min(cfg.warmup, 1), device), users)
    return {'name': name, 'precision': precision, 'train_step': train, 'eval_batch': evaluation,
            'peak_memory_mb': peak_memory_mb(device)}


def profile_ops(fn, device, top):
    """The `top` operators of one call of fn by their own time: [{op, self_ms, share, calls}]."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == 'cuda'
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        sync(device)
    events = [e for e in prof.key_averages() if not e.key.startswith('ProfilerStep')]
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(own(e) for e in events) or 1
    ranked = sorted(events, key=own, reverse=True)[:top]
    return [{'op': e.key, 'self_ms': round(own(e) / 1000, 1), 'share': round(own(e) / total, 3), 'calls': e.count}
            for e in ranked]


def profile_table(title, ops):
    lines = [title, f'{"operator":48s}{"self ms":>10s}{"share":>8s}{"calls":>7s}']
    lines += [f'{o["op"][:47]:48s}{o["self_ms"]:10.1f}{o["share"]:8.1%}{o["calls"]:7d}' for o in ops]
    return '\n'.join(lines)


def significant(x, digits=3):
    """x to `digits` significant digits: a slow rate on a busy machine stays above zero (a floor divides by it)."""
    return float(f'{x:.{digits}g}')


def machine_rates(device, rows, width, repeats=5):
    """What the machine does at the model's shapes: GFLOP/s of the first feed-forward product of a batch,
    (rows x width) by (width x 4 width), in fp32 and bf16, and millions of 64-bit random words a second
    from torch's generator (the dropout masks and lambda draw from it)."""
    rates = {}
    for name, dtype in (('float32', torch.float32), ('bfloat16', torch.bfloat16)):
        a = torch.randn(rows, width, device=device, dtype=dtype)
        b = torch.randn(width, 4 * width, device=device, dtype=dtype)
        seconds = statistics.median(timed(lambda: a @ b, repeats, 1, device))
        rates[f'gemm_gflops_{name}'] = significant(2 * rows * width * 4 * width / seconds / 1e9)
    words = torch.empty(2 ** 21, dtype=torch.int64, device=device)
    seconds = statistics.median(timed(lambda: words.random_(-2 ** 63, 2 ** 63 - 1), repeats, 1, device))
    rates['random_mwords_per_s'] = significant(words.numel() / seconds / 1e6)
    return rates


def matmul_gflop(cfg, n_items):
    """Matrix-product work (GFLOP, 2 per multiply-add) of a training step and of an evaluation batch of the
    transformer approximator. Multiply-adds of a forward pass: per token and full block 12 d^2 (q, k, v, out:
    4 d^2; W1, W2: 8 d^2) and 2 L d of attention; the last block computes keys and values for every token and
    the rest for the last position only; the time MLP 8 d^2 per sequence. Training is forward and backward
    (3x) with the logits; evaluation is T forward passes and the logits once."""
    d, L, B = cfg.hidden_size, cfg.max_len, cfg.batch_size
    tokens = B * L
    full_blocks = (cfg.num_blocks - 1) * tokens * (12 * d * d + 2 * L * d)
    forward = full_blocks + tokens * 2 * d * d + B * (10 * d * d + 2 * L * d) + B * 8 * d * d
    logits = B * d * (n_items + 1)
    return {'train_step': 2 * 3 * (forward + logits) / 1e9,
            'eval_batch': 2 * (cfg.diffusion_steps * forward + logits) / 1e9}


def floor_ratios(row, floors, precision):
    """How far the measured medians of `row` are from the matrix products alone (matmul_gflop at the rate
    measured in the same run) in the run's precision: {'train_step': ratio, 'eval_batch': ratio}."""
    rate = {'fp32': 'float32', 'bf16': 'bfloat16'}[precision]
    return {k: round(row[k]['median_ms'] / floors[f'{k}_ms_{rate}'], 2) for k in ('train_step', 'eval_batch')}


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
    """Exit status 0, or 2 with one error line for bad input, found before anything is timed."""
    utils.keep_freed_memory()  # as main.py does
    try:
        cfg = parse_args(argv)
        check_config(cfg)
        if cfg.compare and model_class(cfg.model) is not DiffuRec:
            raise ValueError(f'--compare times the plain implementation of DiffuRec; drop it with --model {cfg.model}')
        if cfg.json is not None:  # its folder is made and proven writable before the minutes of timing
            cli.writable_file(cfg.json, '--json')
        device = utils.choose_device(cfg.device)
        data = load_dataset(cfg.dataset, cfg.data_dir)
    except (ValueError, DataError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return bench(cfg, device, data)


def bench(cfg, device, data):
    """The benchmark of a checked config on loaded data: prints the tables, writes --json; returns 0."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    utils.set_seed(cfg.random_seed)
    model_type = model_class(cfg.model)
    samples = build_samples(data, cfg.max_len)
    samples['train'] = model_type.training_samples(data, cfg.max_len, samples['train'])  # as main.py trains it
    samples = {k: (x.to(device), y.to(device)) for k, (x, y) in samples.items()}
    n_items = len(data['smap'])
    model = build_model(cfg, n_items).to(device)
    if cfg.compile:
        model.compile_for_speed()
    name = 'fast (model.py)' if model_type is DiffuRec else f'{model_type.title} ({model_type.__module__}.py)'
    rows = [bench_model(name, model, samples, cfg, device, cfg.precision)]
    if cfg.compare:
        from spec_reference import PlainDiffuRec
        utils.set_seed(cfg.random_seed)
        reference = DiffuRec.from_config(cfg, n_items).to(device)
        plain = PlainDiffuRec(reference, cfg.dropout, cfg.emb_dropout)
        rows.append(bench_model('plain spec (reference)', reference, samples, cfg, device, 'fp32', plain=plain))
    steps = f'T {cfg.diffusion_steps}, ' if 'diffusion_steps' in model_type.own_flags else ''
    hardware = utils.hardware(device)
    print(f'{model_type.title} benchmark: {cfg.dataset}, batch {cfg.batch_size}, '
          f'{steps}d {cfg.hidden_size}, {cfg.num_blocks} blocks; device {device} ({hardware}); '
          f'torch {torch.__version__}; {torch.get_num_threads()} threads')
    print(table(rows))
    n_batches = -(-len(samples['train'][1]) // cfg.batch_size)
    epoch_seconds = round(n_batches * rows[0]['train_step']['median_ms'] / 1000, 1)
    print(f'an epoch of training: {n_batches} steps, about {epoch_seconds} s at the median step')
    report = {'dataset': cfg.dataset, 'device': str(device),
              'hardware': hardware,
              'threads': torch.get_num_threads(), 'torch_version': torch.__version__, 'compile': cfg.compile,
              'config': utils.config_dict(cfg), 'results': rows,
              'epoch': {'steps': n_batches, 'train_seconds_at_median': epoch_seconds}}
    tokens, width = cfg.batch_size * cfg.max_len, cfg.hidden_size
    rates = machine_rates(device, tokens, width)
    report['machine'] = rates
    print(f'machine: products of {tokens} x {width} by {width} x {4 * width} at {rates["gemm_gflops_float32"]:g} '
          f'GFLOP/s in fp32 and {rates["gemm_gflops_bfloat16"]:g} in bf16; '
          f'{rates["random_mwords_per_s"]} M random 64-bit words/s')
    if model_type is DiffuRec and cfg.approximator == 'transformer':  # the products matmul_gflop counts
        work = matmul_gflop(cfg, n_items)
        floors = {f'{k}_ms_{p}': significant(1000 * gflop / rates[f'gemm_gflops_{p}'])
                  for k, gflop in work.items() for p in ('float32', 'bfloat16')}
        report['matmul_gflop'], report['matmul_floor'] = work, floors
        print(f'matrix products alone at those rates: training step {work["train_step"]:.4g} GFLOP = '
              f'{floors["train_step_ms_float32"]:g} ms fp32, {floors["train_step_ms_bfloat16"]:g} ms bf16; '
              f'evaluation batch {work["eval_batch"]:.4g} GFLOP = {floors["eval_batch_ms_float32"]:g} ms fp32, '
              f'{floors["eval_batch_ms_bfloat16"]:g} ms bf16')
        report['floor_ratio'] = floor_ratios(rows[0], floors, cfg.precision)
        print(f'median over its floor ({cfg.precision}): training step {report["floor_ratio"]["train_step"]:g}x, '
              f'evaluation batch {report["floor_ratio"]["eval_batch"]:g}x')
    if cfg.profile:
        train_step, eval_batch, _ = make_steps(model, samples, cfg, device, cfg.precision)
        train_step()  # warm
        report['profile'] = {'train_step': profile_ops(train_step, device, cfg.profile),
                             'eval_batch': profile_ops(eval_batch, device, cfg.profile)}
        print(profile_table('one training step, by own time:', report['profile']['train_step']))
        print(profile_table('one evaluation batch, by own time:', report['profile']['eval_batch']))
    if cfg.compare:
        fast, ref = rows
        report['speedup'] = {
            'train': round(ref['train_step']['median_ms'] / fast['train_step']['median_ms'], 2),
            'eval': round(ref['eval_batch']['median_ms'] / fast['eval_batch']['median_ms'], 2)}
        print(f'speed-up over the plain implementation: training x{report["speedup"]["train"]}, '
              f'evaluation x{report["speedup"]["eval"]}')
    if cfg.json:
        utils.write_json(report, cfg.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
