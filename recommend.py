"""Recommendations from a trained run: every user's top-K items, in the dataset's original ids.

    python main.py --recommend RUN_DIR --topk 20 --out recs.csv [--exclude_history]

The model is rebuilt from the run's checkpoint (its config and weights; the kept model when one was kept)
and the dataset is loaded as the run loaded it. Each user's input is the whole known history,
train + val + test (its last max_len items), so the list is a forecast of the item after the test item.
"""
import csv
import os

import torch

import cli
import utils
from config import check_sample_steps
from data import DataError, build_samples, full_history_inputs, histories, load_dataset, samples_checksum
from metrics import score_batches
from model import build_model, model_class
from rundir import CHECKPOINT, check_run_dir, load_checkpoint, recommendations_file, saved_config

CSV_FIELDS = ('user', 'rank', 'item', 'score')


def load_run(run_dir):
    """(model on the CPU in eval mode, the run's config dict, the checkpoint) of a run directory.

    The weights are the checkpoint's kept model ('kept_model'), else its last one ('model'); the config
    is the checkpoint's 'config', else the run's config.json. Raises ValueError (one line) when the
    directory, the checkpoint or its contents are missing or unusable.
    """
    check_run_dir(run_dir, '--recommend')
    checkpoint = load_checkpoint(os.path.join(run_dir, CHECKPOINT))
    if not isinstance(checkpoint, dict) or 'model' not in checkpoint or 'n_items' not in checkpoint:
        raise ValueError(f'{run_dir}/{CHECKPOINT} is not a checkpoint of this project (no model or n_items)')
    config = saved_config(run_dir, checkpoint)
    state = checkpoint['kept_model'] if checkpoint.get('kept_model') is not None else checkpoint['model']
    try:
        model = build_model(config, checkpoint['n_items'])
        model.load_state_dict(state)
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f'{run_dir}: the checkpoint does not match its config '
                         f'({type(e).__name__}: {str(e).splitlines()[0][:120]})') from None
    return model.eval(), config, checkpoint


def top_items(model, inputs, histories, k, batch_size, device, exclude_history=False, precision='fp32',
              sample_steps=None):
    """Each row's k best items: inputs (U, L) long -> (items (U, k) long, scores (U, k) float), best first.

    Scored by the evaluation loop (metrics.score_batches). The padding row 0 is never recommended.
    histories: one list of item ids per row, excluded when exclude_history. An excluded item scores -inf;
    a row with fewer than k items left keeps -inf entries at its end.
    """
    items, scores = [], []
    for _, _, s in score_batches(model, inputs, batch_size, device, histories=histories if exclude_history else None,
                                 precision=precision, sample_steps=sample_steps, desc='recommend'):
        s[:, 0] = float('-inf')
        best = s.topk(k, dim=1)
        items.append(best.indices.cpu())
        scores.append(best.values.cpu())
    return torch.cat(items), torch.cat(scores)


def write_recommendations(path, items, scores, umap, smap):
    """CSV with columns user, rank, item, score: one row per (user, rank), users ascending, rank 1 first.

    users and items are the dataset's original ids (umap / smap inverted); entries scoring -inf (fewer
    than k items left) are left out. Written to a temporary file and renamed: the file is always whole.
    """
    user_of = {new: original for original, new in umap.items()}
    item_of = {new: original for original, new in smap.items()}
    missing = next((u for u in range(len(items)) if u not in user_of), None)
    if missing is not None:
        raise DataError(f'umap has no original id for user {missing}; the dataset is inconsistent')

    def write(f):
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for u, (row_items, row_scores) in enumerate(zip(items.tolist(), scores.tolist())):
            for rank, (item, score) in enumerate(zip(row_items, row_scores), start=1):
                if score != float('-inf'):
                    writer.writerow((user_of[u], rank, item_of[item], f'{score:.6g}'))
    utils.write_atomic(path, write)


def recommend(cfg, default_data_dir):
    """`--recommend RUN_DIR`: write every user's top cfg.topk items to cfg.out (default
    RUN_DIR/recommendations.csv) and return the path.

    The dataset is the run's (--dataset and --max_len of its config); its --data_dir unless cfg.data_dir
    differs from default_data_dir. Sampling is seeded with cfg.random_seed, so a rerun gives the same file.
    cfg.sample_steps and cfg.precision: None for the run's own values (config.resolve leaves them None
    unless given), else the value to use.
    """
    run_dir = cfg.recommend
    model, config, checkpoint = load_run(run_dir)
    data_dir = cfg.data_dir if cfg.data_dir != default_data_dir else config.get('data_dir', cfg.data_dir)
    data = load_dataset(config['dataset'], data_dir)
    n_items = len(data['smap'])
    if n_items != checkpoint['n_items']:
        raise ValueError(f'dataset {config["dataset"]} in {data_dir} has {n_items} items but the run\'s model '
                         f'has {checkpoint["n_items"]}: not the data the run was trained on')
    expected = checkpoint.get('data_checksum')
    if expected and samples_checksum(*build_samples(data, config['max_len'])['train']) != expected:
        raise ValueError(f'dataset {config["dataset"]} in {data_dir} differs from the data the run was trained on '
                         f'(training-sample checksum is not {expected})')
    if cfg.topk > n_items:
        raise ValueError(f'--topk {cfg.topk} exceeds the {n_items} items of {config["dataset"]}')
    sample_steps = cfg.sample_steps if cfg.sample_steps is not None else config['sample_steps']
    precision = cfg.precision or config['precision']
    if sample_steps is not None:
        run_model = model_class(config['model'])
        if 'sample_steps' not in run_model.own_flags:
            raise ValueError(f'--sample_steps configures DiffuRec\'s sampling; the run in {run_dir} is '
                             f'{run_model.name}: drop it')
        check_sample_steps(sample_steps, config['diffusion_steps'], source="the run's --diffusion_steps")
    out = recommendations_file(run_dir, cfg.out)
    device = utils.choose_device(cfg.device)
    utils.set_seed(cfg.random_seed)
    inputs = full_history_inputs(data, config['max_len'])
    cli.writable_file(out, '--out')  # its folder, made before the minutes of scoring
    print(f'recommending with {"all" if sample_steps is None else sample_steps} sampling steps, {precision}')
    items, scores = top_items(model.to(device), inputs, histories(data, 'all'), cfg.topk, cfg.batch_size, device,
                              exclude_history=cfg.exclude_history, precision=precision, sample_steps=sample_steps)
    try:
        write_recommendations(out, items, scores, data['umap'], data['smap'])
    except OSError as e:
        raise ValueError(f'cannot write {out} ({e.strerror}); choose another --out') from None
    return out
