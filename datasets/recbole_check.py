"""RecBole's own SASRec on a dataset exported by to_recbole.py, trained in pieces that stop before a time
limit and go on exactly where they stopped: the outside check of docs/sasrec.md.

Usage, in the RecBole environment (datasets/requirements-recbole.txt), from the repository root::

    python datasets/to_recbole.py amazon_beauty
    python datasets/recbole_check.py amazon_beauty --time_limit 150m

RecBole builds the data, the split, the model, the optimizer and the evaluator from the config
(default datasets/recbole_sasrec.yaml) as its ``run_recbole`` does, and runs its own epochs, validations and
early-stopping rule (``Trainer._train_epoch``, ``_valid_epoch``, ``early_stopping``); this script only orders
them, so that a piece can stop after a validation and the next one go on from there. Each validation writes
OUT/resume.pth (model, optimizer, the early-stopping counters, the shuffling generator and the global random
states, so a run cut into pieces trains as the uncut one), and each better model OUT/best.pth. A piece runs
at least one block of ``eval_step`` epochs and its validation, then starts another only if the time left
covers the slowest block so far. When the run stops early or reaches its epochs, the best model is tested
by RecBole's metrics and, on the same score rows, by this project's (metrics.py), and OUT/results.json
written; removing results.json tests the finished run's best model again. Exit status: 0 finished, 2 bad
input, 3 paused by --time_limit (run the same command again).
"""

from __future__ import annotations

import platform
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":  # run as a script from datasets/: the project's modules are one folder up
    sys.path.insert(0, str(HERE.parent))
from metrics import average_metrics, format_metrics, metric_sums  # noqa: E402
from prepare import one_line_errors  # noqa: E402
from stopping import BAD_INPUT, DONE, PAUSED  # noqa: E402
from cli import ArgumentParser, duration  # noqa: E402
from utils import write_atomic, write_json  # noqa: E402

DEFAULT_CONFIG = HERE / "recbole_sasrec.yaml"
RESUME, BEST, RESULTS, LOG = "resume.pth", "best.pth", "results.json", "log.txt"


def recbole_sasrec():
    """RecBole's SASRec class, with autograd's anomaly detection off again after the import.

    Importing RecBole's models turns it on for the whole process (``torch.autograd.set_detect_anomaly(True)``
    in its sine.py, RecBole 1.2.1): a stack trace recorded for every operator and every gradient checked, the
    same numbers at twice the time a training step (docs/sasrec.md).
    """
    import torch
    from recbole.model.sequential_recommender import SASRec
    torch.autograd.set_detect_anomaly(False)
    return SASRec


def build(dataset, config_file, out):
    """(config, train, valid and test loaders, trainer) as run_recbole makes them, best models saved to OUT."""
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.trainer import Trainer
    from recbole.utils import init_logger, init_seed

    SASRec = recbole_sasrec()
    argv, sys.argv = sys.argv, sys.argv[:1]  # RecBole's Config takes --key=value from sys.argv: ours are not its
    try:
        config = Config(model="SASRec", dataset=dataset, config_file_list=[str(config_file)],
                        config_dict={"checkpoint_dir": str(out)})
    finally:
        sys.argv = argv
    inter = Path(config["data_path"]) / f"{dataset}.inter"
    if not inter.is_file():
        raise ValueError(f"{inter} is missing; export it first: python datasets/to_recbole.py {dataset}")
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    train, valid, test = data_preparation(config, create_dataset(config))
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = SASRec(config, train._dataset).to(config["device"])
    trainer = Trainer(config, model)
    trainer.saved_model_file = str(out / BEST)
    return config, train, valid, test, trainer


def random_states(train):
    import numpy as np
    import torch
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate(),
            "shuffle": train.generator.get_state()}


def set_random_states(train, states):
    import numpy as np
    import torch
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["random"])
    train.generator.set_state(states["shuffle"])


def save(path, state):
    import torch
    write_atomic(str(path), lambda f: torch.save(state, f), binary=True)


def load(path):
    import torch
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)  # the script's own files
    except Exception as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}); remove the run's folder to start "
                         f"it again") from None


def target_sums(scores, positive_u, positive_i, ks):
    """This project's HR@K / NDCG@K sums (metrics.metric_sums, as its evaluation loop adds them) over one batch
    of RecBole's full-ranking score rows: scores (B, items) with row b's target item positive_i[j] where positive_u[j] = b.
    -> ((2 len(ks),) sums in metrics.metric_names(ks) order, B). Leave-one-out gives each row one target."""
    import torch
    rows = positive_u.cpu()
    if not torch.equal(rows, torch.arange(scores.shape[0])):
        raise ValueError("a test batch whose rows do not each have exactly one target item; the check needs "
                         "RecBole's leave-one-out split (eval_args split LS)")
    return metric_sums(scores.detach().float().cpu(), positive_i.cpu(), list(ks)), len(rows)


def test_both_ways(trainer, test, ks):
    """RecBole's test of trainer.model, and this project's metrics of the very score rows RecBole ranks:
    (RecBole's result, {'HR@K': percent, 'NDCG@K': percent}, averaged over users as RecBole does).
    RecBole's test figures are left unrounded (it rounds to metric_decimal_place, 4 by default), so that the
    two can be compared beyond its fourth decimal; validation, and so the model kept, is not affected."""
    import torch
    for metric in trainer.evaluator.metric_class.values():
        metric.decimal_place = 12
    collector, batches = trainer.eval_collector, []
    collect = collector.eval_batch_collect

    def collect_and_keep(scores, interaction, positive_u, positive_i):
        batches.append(target_sums(scores, positive_u, positive_i, ks))
        return collect(scores, interaction, positive_u, positive_i)

    collector.eval_batch_collect = collect_and_keep
    try:
        result = trainer.evaluate(test, load_best_model=False, show_progress=False)
    finally:
        del collector.eval_batch_collect  # back to the class's method
    sums = torch.stack([b[0] for b in batches])
    counts = torch.tensor([b[1] for b in batches])
    return result, average_metrics(sums, counts, list(ks), "user")


def fresh_progress():
    return {"epoch": -1, "losses": [], "epoch_seconds": [], "validations": [], "best_epoch": None,
            "best_valid": None, "pieces": 0, "stopped": False}


def run(args):
    """One piece: train until the run stops or the time is spent; test when it has stopped. Exit status."""
    started = time.monotonic()
    out = Path(args.out or Path("runs") / "recbole_check" / args.dataset)
    if (out / RESULTS).is_file():
        print(f"{out}: the run has finished, its results are in {out / RESULTS}")
        return DONE
    out.mkdir(parents=True, exist_ok=True)
    config, train, valid, test, trainer = build(args.dataset, args.config, out)
    progress = fresh_progress()
    if (out / RESUME).is_file():
        state = load(out / RESUME)
        trainer.model.load_state_dict(state["state_dict"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.cur_step, trainer.best_valid_score = state["cur_step"], state["best_valid_score"]
        trainer.best_valid_result = state["progress"]["best_valid"]
        set_random_states(train, state["random"])
        progress = state["progress"]
    if not progress["stopped"]:  # else only the test is left (removed results.json): no training piece
        progress["pieces"] += 1
    log = open(out / LOG, "a")

    def say(line):
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    from recbole.utils import early_stopping
    say(f"testing the kept model of epoch {progress['best_epoch']}" if progress["stopped"] else
        f"piece {progress['pieces']}: RecBole SASRec on {args.dataset}, from epoch {progress['epoch'] + 1}")
    trainer.eval_collector.data_collect(train)
    block, block_started, slowest = trainer.eval_step, time.monotonic(), 0.0
    for epoch in range(progress["epoch"] + 1, trainer.epochs if not progress["stopped"] else 0):
        t0 = time.monotonic()
        loss = trainer._train_epoch(train, epoch, show_progress=False)
        progress["losses"].append(float(sum(loss) if isinstance(loss, tuple) else loss))
        progress["epoch_seconds"].append(round(time.monotonic() - t0, 2))
        say(f"epoch {epoch}  loss {progress['losses'][-1]:.4f}  {progress['epoch_seconds'][-1]:.1f}s")
        if (epoch + 1) % block and epoch + 1 < trainer.epochs:
            continue
        t0 = time.monotonic()
        score, result = trainer._valid_epoch(valid, show_progress=False)
        trainer.best_valid_score, trainer.cur_step, stop, better = early_stopping(
            score, trainer.best_valid_score, trainer.cur_step, max_step=trainer.stopping_step,
            bigger=trainer.valid_metric_bigger)
        if better:
            trainer._save_checkpoint(epoch, verbose=False)
            trainer.best_valid_result, progress["best_epoch"] = dict(result), epoch
        progress["validations"].append({"epoch": epoch, "seconds": round(time.monotonic() - t0, 2),
                                        **{k: float(v) for k, v in result.items()}})
        progress["best_valid"] = trainer.best_valid_result
        progress["epoch"] = epoch
        progress["stopped"] = stop = stop or epoch + 1 >= trainer.epochs
        say(f"valid epoch {epoch}: " + "  ".join(f"{k} {float(v):.4f}" for k, v in result.items())
            + ("  best" if better else ""))
        save(out / RESUME, {"state_dict": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                            "cur_step": trainer.cur_step, "best_valid_score": trainer.best_valid_score,
                            "random": random_states(train), "progress": progress})
        slowest, block_started = max(slowest, time.monotonic() - block_started), time.monotonic()
        if stop:
            break
        if args.time_limit and args.time_limit - (time.monotonic() - started) < slowest:
            say(f"time limit: paused after epoch {epoch}; run the same command to go on")
            return PAUSED
    best = load(out / BEST)
    trainer.model.load_state_dict(best["state_dict"])
    trainer.model.load_other_parameter(best.get("other_parameter"))
    result, ours = test_both_ways(trainer, test, config["topk"])
    import recbole
    import torch
    results = {"dataset": args.dataset, "recbole_version": recbole.__version__, "torch_version": torch.__version__,
               "test": {k: float(v) for k, v in result.items()}, "test_by_this_projects_metrics": ours,
               "best_epoch": progress["best_epoch"],
               "best_valid": progress["best_valid"], "epochs_run": progress["epoch"] + 1,
               "validations": progress["validations"], "losses": progress["losses"],
               "epoch_seconds": progress["epoch_seconds"], "pieces": progress["pieces"],
               "config": {k: config[k] for k in ("n_layers", "n_heads", "hidden_size", "inner_size",
                                                 "hidden_dropout_prob", "attn_dropout_prob", "hidden_act",
                                                 "loss_type", "MAX_ITEM_LIST_LENGTH", "train_batch_size",
                                                 "learning_rate", "epochs", "eval_step", "stopping_step",
                                                 "valid_metric", "seed")},
               "host": platform.node(), "threads": torch.get_num_threads()}
    write_json(results, str(out / RESULTS))
    say(f"test: {format_metrics(results['test'])}; the same scores by this project's metrics (percent): "
        f"{format_metrics(ours)}; written to {out / RESULTS}")
    return DONE


def main(argv=None):
    return one_line_errors(lambda: _main(argv))


def _main(argv):
    parser = ArgumentParser(prog="recbole_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="a dataset exported by datasets/to_recbole.py")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="RecBole config (YAML)")
    parser.add_argument("--out", default=None, help="the run's folder (default runs/recbole_check/DATASET)")
    parser.add_argument("--time_limit", type=duration, default=None, metavar="T",
                        help="stop after the validation past which another block would not fit (90s, 9m, 1.5h)")
    args = parser.parse_args(argv)
    try:
        import recbole  # noqa: F401
    except ImportError:
        print("error: RecBole is not installed here; make its environment with "
              "pip install -r datasets/requirements-recbole.txt (docs/sasrec.md)", file=sys.stderr)
        return BAD_INPUT
    if not args.config.is_file():
        print(f"error: --config {args.config}: no such file", file=sys.stderr)
        return BAD_INPUT
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
