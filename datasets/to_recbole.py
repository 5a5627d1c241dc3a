"""Export a project dataset to RecBole's atomic ``.inter`` file (the outside SASRec check, docs/sasrec.md).

Usage::

    python datasets/to_recbole.py NAME [--data_dir DIR] [--out_dir OUT] [--overwrite]

reads ``DIR/NAME/dataset.pkl`` with the project's safe loader (as ``main.py --dataset NAME`` does) and
writes ``OUT/NAME/NAME.inter`` (default OUT: ``datasets/recbole`` of this repository), where RecBole finds
it with ``data_path: OUT`` and ``dataset: NAME``; ``datasets/recbole_sasrec.yaml`` is the matching config.

The file is tab-separated with the header ``user_id:token  item_id:token  timestamp:float`` and one row
per interaction, users ascending, each user's train + val + test items in order.  The tokens are the
project's own ids (user 0..m-1, item 1..n), so RecBole's ``field2id_token`` maps its internal ids back
to them, and the dataset's ``umap`` / ``smap`` map them on to the original ids.  The timestamp is the
row number: RecBole's leave-one-out on time order (``LS: valid_and_test``, ``order: TO``) then gives
exactly the project's split.  ``datasets/prepare.py`` reads such a file back (``--format recbole``).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":  # run as a script from datasets/ (where prepare.py lies): data.py is one folder up
    sys.path.insert(0, str(HERE.parent))
from data import DEFAULT_DATA_DIR, DataError, check_name, load_dataset  # noqa: E402
from prepare import inter_lines, one_line_errors  # noqa: E402
from cli import ArgumentParser  # noqa: E402
from utils import write_atomic  # noqa: E402

DEFAULT_OUT_DIR = HERE / "recbole"


def export(name: str, data_dir=None, out_dir=None, overwrite: bool = False) -> tuple:
    """Write ``out_dir/name/name.inter`` from ``data_dir/name/dataset.pkl``.

    Returns (path, users, items, rows).  DataError on a bad dataset or an existing file without overwrite.
    """
    check_name(name)
    data = load_dataset(name, str(data_dir) if data_dir is not None else DEFAULT_DATA_DIR)
    target = Path(out_dir if out_dir is not None else DEFAULT_OUT_DIR) / name / f"{name}.inter"
    if target.exists() and not overwrite:
        raise DataError(f"{target} already exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, lambda f: f.writelines(inter_lines(data)))
    rows = sum(len(s) + 2 for s in data["train"].values())
    return target, len(data["train"]), len(data["smap"]), rows


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="to_recbole.py",
                       description="Write a project dataset as RecBole's atomic .inter file "
                                   "(same sequences, same leave-one-out split).")
    p.add_argument("name", help="dataset name, as for main.py --dataset")
    p.add_argument("--data_dir", default=None,
                   help="folder holding NAME/dataset.pkl (default: datasets/data of this repository)")
    p.add_argument("--out_dir", default=None,
                   help="RecBole's data_path: writes OUT/NAME/NAME.inter (default: datasets/recbole)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing .inter file")
    p.add_argument("--quiet", action="store_true", help="no summary line")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    return one_line_errors(lambda: _run(parser.parse_args(argv)))


def _run(args) -> int:
    path, users, items, rows = export(args.name, args.data_dir, args.out_dir, args.overwrite)
    if not args.quiet:
        print(f"wrote {path}: {users:,} users, {items:,} items, {rows:,} interactions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
