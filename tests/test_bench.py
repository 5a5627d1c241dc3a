"""bench.py: the table, the JSON report, the profile, and its count of the model's matrix-product work."""
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import bench
from config import build_parser
from model import DiffuRec
import utils

SMALL = ['--dataset', 'synthetic', '--hidden_size', '16', '--num_blocks', '2', '--diffusion_steps', '4',
         '--max_len', '10', '--batch_size', '32', '--steps', '2', '--eval_batches', '1', '--warmup', '1']


def test_bench_prints_the_table_and_writes_the_report(tmp_path, capsys):
    path = tmp_path / 'bench.json'
    assert bench.main(SMALL + ['--compare', '--profile', '5', '--json', str(path)]) == 0
    out = capsys.readouterr().out
    assert 'train ms/step' in out and 'plain spec (reference)' in out and 'speed-up over the plain' in out
    assert 'one training step, by own time:' in out and 'GFLOP/s' in out
    report = json.loads(path.read_text())
    fast, plain = report['results']
    for row in (fast, plain):
        for measure in ('train_step', 'eval_batch'):
            r = row[measure]
            assert 0 < r['min_ms'] <= r['median_ms'] <= r['max_ms'] and r['samples_per_s'] > 0
    assert report['speedup']['train'] > 0 and report['threads'] == torch.get_num_threads()
    assert report['hardware'] == utils.hardware(torch.device('cpu'))
    assert f"device cpu ({report['hardware']}); torch" in out
    assert all(report['machine'][k] > 0 for k in ('gemm_gflops_float32', 'gemm_gflops_bfloat16',
                                                  'random_mwords_per_s'))
    # the ratio of each median to the matrix products alone, at the rate measured in the same run (fp32 here)
    for part in ('train_step', 'eval_batch'):
        floor = report['matmul_gflop'][part] * 1000 / report['machine']['gemm_gflops_float32']
        # the report rounds the ratio to two decimals: up to 0.005 off, more than 2% of a ratio below 0.25
        assert report['floor_ratio'][part] == pytest.approx(fast[part]['median_ms'] / floor, rel=2e-2, abs=5e-3)
    assert f'median over its floor (fp32): training step {report["floor_ratio"]["train_step"]:g}x' in out
    for part in ('train_step', 'eval_batch'):
        ops = report['profile'][part]
        assert len(ops) == 5 and all(0 < o['share'] <= 1 and o['calls'] >= 1 for o in ops)
        assert [o['self_ms'] for o in ops] == sorted((o['self_ms'] for o in ops), reverse=True)


def test_bench_times_sasrec_with_its_defaults_and_its_epoch(tmp_path, capsys):
    path = tmp_path / 'bench.json'
    argv = ['--model', 'sasrec', '--dataset', 'synthetic', '--steps', '2', '--eval_batches', '1', '--warmup', '1',
            '--json', str(path)]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith('SASRec benchmark: synthetic') and 'SASRec (sasrec.py)' in out
    report = json.loads(path.read_text())
    assert report['config']['model'] == 'sasrec' and report['config']['heads'] == 1  # SASRec's preset
    assert 'matmul_gflop' not in report  # the product count is DiffuRec's
    # synthetic: one training row per user (400), batch 256 (its preset) -> 2 steps an epoch
    step = report['results'][0]['train_step']['median_ms']
    assert report['epoch'] == {'steps': 2, 'train_seconds_at_median': round(2 * step / 1000, 1)}
    assert bench.main(argv + ['--compare']) == 2
    assert capsys.readouterr().err.strip() == \
        'error: --compare times the plain implementation of DiffuRec; drop it with --model sasrec'


def test_machine_rates_of_a_starved_machine_stay_above_zero(monkeypatch):
    """A tiny product timed on a busy host is well under 0.1 GFLOP/s; rounding it to a decimal gave 0 and the
    floor's division failed. The rates keep three significant digits."""
    monkeypatch.setattr(bench, 'timed', lambda fn, n, warmup, device: [0.5] * n)
    rates = bench.machine_rates(torch.device('cpu'), rows=320, width=16)
    assert rates == {'gemm_gflops_float32': 0.00131, 'gemm_gflops_bfloat16': 0.00131, 'random_mwords_per_s': 4.19}


def test_bench_error_is_one_line(tmp_path, capsys):
    assert bench.main(['--dataset', 'nope', '--data_dir', str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ')


@pytest.mark.parametrize('blocks', [1, 3])
def test_matmul_work_matches_a_flop_count_of_the_model(blocks):
    """The bound bench.py reports rests on this count: torch's own FLOP counter over an evaluation batch
    (T forward passes and the logits) and a training step (forward, backward and the logits)."""
    cfg = build_parser().parse_args(['--hidden_size', '32', '--num_blocks', str(blocks), '--diffusion_steps', '3',
                                     '--max_len', '12', '--batch_size', '5'])
    torch.manual_seed(0)
    n_items = 40
    model = DiffuRec.from_config(cfg, n_items)
    seq = torch.randint(0, n_items + 1, (cfg.batch_size, cfg.max_len))
    work = bench.matmul_gflop(cfg, n_items)
    # the counter does not know the CPU's fused kernels (attention; linear layers with bias, activation or
    # residual fused in): count them as the plain operators are counted
    fused = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
             lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
             torch.ops.mkldnn._linear_pointwise:  # both overloads: x (..., K) -> out (..., N)
             lambda x, *args, out_shape=None, **kwargs: 2 * math.prod(out_shape) * x[-1]}
    with FlopCounterMode(display=False, custom_mapping=fused) as count:
        model.eval().scores(seq)
    assert count.get_total_flops() == pytest.approx(work['eval_batch'] * 1e9, rel=1e-12)
    with FlopCounterMode(display=False) as count:
        model.train()(seq, torch.randint(1, n_items + 1, (cfg.batch_size,)))[0].backward()
    # less the one backward product that needs no doing: the time embedding asks for no gradient
    d = cfg.hidden_size
    assert count.get_total_flops() == pytest.approx(work['train_step'] * 1e9 - 2 * cfg.batch_size * 4 * d * d,
                                                    rel=1e-12)
