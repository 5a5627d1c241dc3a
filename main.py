"""DiffuRec: train, validate and test on a sequential-recommendation dataset.

    python main.py --dataset amazon_beauty          # the paper's experiment
    python main.py --dataset synthetic              # a minute on a CPU, no download

Every flag of the authors' script keeps its name and default; `python main.py --help` lists them all.
"""
import argparse
import collections
import os
import platform
import sys
import time
import warnings

import torch

import cli
import dist_util
import rundir
import utils
from board import require_tensorboard
from aggregate import aggregate_results, aggregate_table
from config import check_config, is_smoke, resolve
from data import (DEFAULT_DATA_DIR, DataError, build_samples, check_available, group_users, histories,
                  load_dataset, load_item_categories, samples_checksum)
from metrics import diversity_metrics, metric_names, metrics_table
from model import build_model, model_class
from plots import plot_curves
from recommend import recommend
from stopping import BAD_INPUT, DONE, PAUSED, STOPPED, RunStopped, TimeBudget, TimeUp
from rundir import check_out_dir, check_run_dir, load_checkpoint, log_copy_name, make_run_dir
from trainer import Trainer


def check_start(cfg):
    """Everything about a config that can be checked before any work (data loading, training): check_config,
    the torchrun and device flags, the dataset's name and file, the files read (opened) and the folders written
    (proven writable, and left as they were), so that no run loses its work to a bad path at its end.
    Raises ValueError or DataError with one line naming the flag and the fix."""
    check_config(cfg)
    rank, world, _ = dist_util.torchrun_env()
    keep = world > 1  # the processes check the same folders at once: none may remove what another probes
    if cfg.num_gpu > 1 and world == 1:  # under torchrun --num_gpu is ignored: torchrun sets the processes
        raise ValueError(f'--num_gpu {cfg.num_gpu}: several GPUs run through torchrun, e.g. '
                         f'torchrun --nproc_per_node {cfg.num_gpu} main.py ... (see docs/long-runs.md)')
    if world > 1:
        check_world(cfg, world)
    utils.check_device(cfg.device)
    if cfg.category_file is not None:
        cli.readable_file(cfg.category_file, '--category_file')
    if cfg.tensorboard is not None:
        require_tensorboard()  # its absence is an error before any work
        cli.writable_dir(cfg.tensorboard, '--tensorboard', create=keep)
    if cfg.recommend:  # reads the run's own dataset; writes one file
        check_run_dir(cfg.recommend, '--recommend')
        cli.writable_file(rundir.recommendations_file(cfg.recommend, cfg.out), '--out', create=keep)
        return
    check_available(cfg.dataset, cfg.data_dir)
    if cfg.log_file:
        cli.writable_dir(cfg.log_file, '--log_file', create=keep)
    check_out_dir(cfg)
    cli.writable_dir(cfg.out_dir or os.path.join('runs', cfg.dataset), '--out_dir', create=keep)


def check_world(cfg, world):
    """Flags that must suit the `world` processes torchrun started; raises ValueError naming the fix."""
    if cfg.batch_size % world:
        raise ValueError(f'--batch_size {cfg.batch_size} is the global batch and must divide evenly among the '
                         f'{world} processes; use a multiple of {world}')
    if cfg.device.startswith('cuda:'):
        raise ValueError(f'--device {cfg.device}: under torchrun each process uses the GPU of its LOCAL_RANK; '
                         f'pass --device cuda or auto (choose GPUs with CUDA_VISIBLE_DEVICES)')


def distribute(model, device, world):
    """The model as trained by `world` processes: itself for one, wrapped in DistributedDataParallel for more."""
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)


def resume(trainer, cfg, data_checksum, rank, world):
    """Load the run's checkpoint into `trainer`, refusing one made on other data."""
    state = load_checkpoint(os.path.join(cfg.resume, rundir.CHECKPOINT))
    if state['data_checksum'] != data_checksum:
        raise ValueError(f'--resume {cfg.resume}: the checkpoint was trained on other data (training samples '
                         f'{state["data_checksum"]}, now {data_checksum}); point --data_dir at the original dataset')
    trainer.load_state_dict(state)
    if world > 1:  # the checkpoint holds rank 0's generators: give each process its own stream again
        utils.seed_per_process(rank, world)
    trainer.log(f'resumed {cfg.resume} at epoch {trainer.epoch}, batch {trainer.batch}')


def run(cfg, clock=time.monotonic):
    """One experiment from a parsed config that check_start has passed: returns the results dict (also
    written to results.json). clock: what --time_limit is counted on."""
    budget = TimeBudget(cfg.time_limit, clock) if cfg.time_limit else None  # counted from here: data loading included
    if cfg.loss_lambda != 0.001:
        warnings.warn('--loss_lambda has no effect: the reference objective never uses it', stacklevel=1)
    procs = start_processes(cfg)
    data, samples, data_checksum = load_samples(cfg, procs.device)
    item_categories = load_item_categories(cfg.category_file, data['smap'])[0] if cfg.category_file else None
    run_dir, log = open_run_dir(cfg, procs.rank, procs.world)
    model, n_params = make_model(cfg, len(data['smap']), procs)
    log(f'{model_class(cfg.model).title} on {cfg.dataset}: {len(data["train"])} users, {len(data["smap"])} items, '
        f'{len(samples["train"][1])} training samples; {n_params:,} parameters; device {procs.device}; run dir '
        f'{run_dir}' + (f'; {procs.world} processes, {cfg.batch_size // procs.world} rows each per batch'
                        if procs.world > 1 else ''))
    if is_smoke(cfg):
        log('smoke run: --limit_train_batches/--limit_eval_batches set, results are marked smoke')
    excluded = ({split: histories(data, split) for split in ('val', 'test')}
                if cfg.exclude_history or cfg.test_both_protocols else None)
    trainer = Trainer(distribute(model, procs.device, procs.world), cfg, samples, run_dir, procs.device, log,
                      rank=procs.rank, world=procs.world, data_checksum=data_checksum, histories=excluded,
                      budget=budget)
    if cfg.resume:
        resume(trainer, cfg, data_checksum, procs.rank, procs.world)
    trainer.fit()
    results, final = test_results(cfg, trainer, item_categories, log)
    results.update(n_params=n_params, device=str(procs.device), torch_version=torch.__version__,
                   smoke=is_smoke(cfg), data_checksum=data_checksum, host=platform.node(),
                   hardware=utils.hardware(procs.device),
                   threads=torch.get_num_threads(), world_size=procs.world)
    if cfg.epoch_time_avg:
        results['epoch_time_avg'] = round(sum(trainer.epoch_seconds) / max(len(trainer.epoch_seconds), 1), 3)
        log(f'mean epoch time: {results["epoch_time_avg"]:.2f}s over {len(trainer.epoch_seconds)} epochs')
    if cfg.long_head:
        results['long_head'] = long_head_results(cfg, trainer, final, data, log)
    if procs.rank == 0:
        utils.write_json(results, os.path.join(run_dir, rundir.RESULTS))
        write_curves(run_dir, trainer, cfg.metric_ks, log)
    log(f'results written to {os.path.join(run_dir, rundir.RESULTS)}')
    return results


Processes = collections.namedtuple('Processes', 'rank world device')


def start_processes(cfg):
    """This process's rank among `world` (torchrun's, else 0 of 1), its device, the process group joined and
    every generator seeded with --random_seed."""
    rank, world, local_rank = dist_util.torchrun_env()
    device = utils.choose_device(cfg.device, local_rank)
    if cfg.precision == 'bf16' and utils.bf16_is_emulated(device):
        warnings.warn('--precision bf16: this CPU has no native bf16 instructions (AVX-512 BF16 or AMX), so its '
                      'bf16 products are emulated and slower than fp32; use --precision fp32 here', stacklevel=1)
    if world > 1:
        dist_util.init_distributed(device, rank, world)
    utils.set_seed(cfg.random_seed)
    return Processes(rank, world, device)


def load_samples(cfg, device):
    """(the dataset, its samples on `device` with the model's training rows, the checksum of the prefix samples)."""
    data = load_dataset(cfg.dataset, cfg.data_dir)
    n_items = len(data['smap'])
    if max(cfg.metric_ks) > n_items:
        raise ValueError(f'--metric_ks {max(cfg.metric_ks)} exceeds the {n_items} items of {cfg.dataset}')
    samples = build_samples(data, cfg.max_len)
    data_checksum = samples_checksum(*samples['train'])  # of the prefix samples, whatever the model
    samples['train'] = model_class(cfg.model).training_samples(data, cfg.max_len, samples['train'])
    samples = {split: (x.to(device), y.to(device)) for split, (x, y) in samples.items()}  # once, not per batch
    return data, samples, data_checksum


def open_run_dir(cfg, rank, world):
    """(the run folder, chosen by rank 0 and made, with config.json written; the run's log, with its copy in
    --log_file). Only rank 0 prints and writes files."""
    run_dir = dist_util.from_rank0(lambda: make_run_dir(cfg), rank, world)
    log_paths = [os.path.join(run_dir, rundir.LOG)]
    if cfg.log_file:
        if rank == 0:
            cli.writable_dir(cfg.log_file, '--log_file')
        log_paths.append(os.path.join(cfg.log_file, log_copy_name(cfg.dataset, run_dir)))
    log = utils.RunLog(log_paths, enabled=rank == 0)
    if rank == 0:
        utils.write_json(utils.config_dict(cfg), os.path.join(run_dir, rundir.CONFIG))
    return run_dir, log


def make_model(cfg, n_items, procs):
    """(the model on its device, compiled under --compile; its trainable parameter count). It is initialised
    alike on every process (same seed); from here on each process draws its own numbers."""
    model = build_model(cfg, n_items).to(procs.device)
    if cfg.compile:
        model.compile_for_speed()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if procs.world > 1:
        utils.seed_per_process(procs.rank, procs.world)
    return model, n_params


def test_results(cfg, trainer, item_categories, log):
    """Test the kept model (the final one when no validation ran): (the start of results.json, logged beside
    the best and kept validation rows, with the diversity of its test top-K; the model tested)."""
    if trainer.kept_state is None:
        log('no validation ran (epochs <= eval_interval): testing the final model')
    final = trainer.final_model()
    topk_items = []
    test = trainer.evaluate_split('test', model=final, topk_items=topk_items)
    summary = trainer.summary()
    rows = {'test': test}
    if trainer.best:
        selection = summary['selection']
        rows = {'best valid': trainer.best, f'kept valid (epoch {selection["epoch"]})': selection['valid'], **rows}
    by_protocol = {}
    if cfg.test_both_protocols:
        other = trainer.evaluate_split('test', model=final, exclude_history=not cfg.exclude_history)
        excluded, ranked = (test, other) if cfg.exclude_history else (other, test)
        by_protocol = {'test_history_ranked': ranked, 'test_history_excluded': excluded}
        rows.update({'test, history ranked': ranked, 'test, history excluded': excluded})
    log('\n' + metrics_table(rows))
    diversity = diversity_metrics(torch.cat(topk_items), final.item_table.weight, final.n_items, item_categories)
    log('diversity of the test top-K: ' + '  '.join(f'{k} {v}' for k, v in diversity.items()))
    return {'model': cfg.model, 'dataset': cfg.dataset, 'config': utils.config_dict(cfg), 'test': test,
            **by_protocol, **summary, 'diversity': diversity}, final


def long_head_results(cfg, trainer, final, data, log):
    """--long_head: the tested model's metrics and user count in each hot/cold and length group, logged."""
    groups = {}
    test_histories = histories(data, 'test')  # a group predicts the test item from train + val
    for name, (inputs, labels, users) in group_users(data, cfg.max_len).items():
        if len(labels):
            group_histories = [test_histories[u] for u in users.tolist()]
            groups[name] = trainer.evaluate_split(name, model=final, data=(inputs, labels, group_histories))
            groups[name]['users'] = len(labels)
    log('group analysis\n' + metrics_table({k: {m: v[m] for m in metric_names(cfg.metric_ks)}
                                            for k, v in groups.items()}))
    return groups


def write_curves(run_dir, trainer, ks, log):
    """curves.png in the run directory when matplotlib is installed, else a one-line notice."""
    path = os.path.join(run_dir, 'curves.png')
    if plot_curves(path, trainer.epoch_losses, trainer.history, metric_names(ks), trainer.kept_epoch):
        log(f'training curves written to {path}')
    else:
        log('matplotlib is not installed: no curves.png (pip install matplotlib to get the training curves)')


def run_seeds(cfg):
    """--seeds S1 S2 ...: run() once per seed, in <out_dir>/seed_<S>/, then aggregate_results over the
    seeds, printed and written to <out_dir>/aggregate.json (returned).

    Under torchrun every process takes part in every run; rank 0 alone makes <out_dir> (its name is sent to
    the others) and prints and writes the aggregate."""
    duplicate = next((s for s in cfg.seeds if cfg.seeds.count(s) > 1), None)
    if duplicate is not None:
        raise ValueError(f'--seeds lists {duplicate} twice; give each seed once')
    if cfg.resume:
        raise ValueError('--seeds cannot be combined with --resume; resume each <out_dir>/seed_<S> run on its own')
    if cfg.time_limit:
        raise ValueError('--seeds cannot be combined with --time_limit; run each seed on its own with --random_seed')
    rank, world, local_rank = dist_util.torchrun_env()
    if world > 1:  # joined here already, for the broadcast of the base folder; run() finds it joined
        check_world(cfg, world)
        dist_util.init_distributed(utils.choose_device(cfg.device, local_rank), rank, world)
    base = dist_util.from_rank0(lambda: make_run_dir(cfg), rank, world)
    per_seed = {}
    for seed in cfg.seeds:
        one = argparse.Namespace(**{**vars(cfg), 'random_seed': seed, 'seeds': None,
                                    'out_dir': os.path.join(base, f'seed_{seed}'),
                                    'tensorboard': cfg.tensorboard and os.path.join(cfg.tensorboard, f'seed_{seed}')})
        check_start(one)  # its own folders
        per_seed[seed] = run(one)
    aggregate = aggregate_results(per_seed)
    aggregate['runs'] = {str(seed): os.path.join(base, f'seed_{seed}') for seed in cfg.seeds}
    if rank == 0:
        utils.write_json(aggregate, os.path.join(base, 'aggregate.json'))
        print(aggregate_table(aggregate))
        print(f'aggregate written to {os.path.join(base, "aggregate.json")}')
    return aggregate


def run_command(cfg, clock=time.monotonic):
    """What main() runs: --recommend, --seeds, or one run (its --time_limit counted on `clock`)."""
    if cfg.recommend:
        if cfg.seeds:
            raise ValueError('--recommend reads a trained run; it cannot be combined with --seeds')
        path = recommend(cfg, default_data_dir=DEFAULT_DATA_DIR)
        print(f'recommendations written to {path}')
    elif cfg.seeds:
        run_seeds(cfg)
    else:
        run(cfg, clock)


def main(argv=None, clock=time.monotonic):
    """Exit status (stopping.py): DONE 0; STOPPED 1, interrupted or a non-finite loss; BAD_INPUT 2; PAUSED 3,
    stopped by --time_limit (resumable, not finished). clock: what --time_limit is counted on (the tests' runs
    pass a fake one)."""
    utils.keep_freed_memory()
    together = False  # whether every process ends at the same point (not after an error of one of them)
    try:
        cfg = resolve(argv)
        check_start(cfg)  # before any work: each run of --seeds checks its own folders again (run_seeds)
        run_command(cfg, clock)
        together = True
    except (ValueError, DataError) as e:
        print(f'error: {e}', file=sys.stderr)
        return BAD_INPUT
    except TimeUp as e:  # resumable, not finished
        together = True
        print(str(e), file=sys.stderr)
        return PAUSED
    except RunStopped as e:  # an interrupt or a non-finite loss, agreed by every process
        together = True
        print(str(e), file=sys.stderr)
        return STOPPED
    finally:
        dist_util.end_distributed(together)
    return DONE


if __name__ == '__main__':
    dist_util.exit_process(main())
