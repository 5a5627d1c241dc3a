"""Tests of datasets/prepare.py (bring your own data).

Also holds ``generate_log``, the generator of large Amazon-like logs used to
measure speed and memory::

    python tests/test_prepare.py make-log /tmp/log10m.csv --rows 10000000
    /usr/bin/time -v python datasets/prepare.py /tmp/log10m.csv --name bench10m \\
        --data_dir /tmp/bench --overwrite
"""

import csv
import gzip
import importlib.util
import io
import json
import math
import pickle
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from data import load_dataset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "datasets" / "prepare.py"


def _load_prepare():
    # Loaded from its path: datasets/ is not a package, and a distinct module
    # name avoids clashing with anything else called "prepare".
    spec = importlib.util.spec_from_file_location("diffurec_prepare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module       # dataclasses look the module up here
    spec.loader.exec_module(module)
    return module


prep = _load_prepare()
PrepareError = prep.DataError


# ----------------------------------------------------------------------------- helpers

def write_log(path, rows, fmt="csv", header=("user_id", "item_id", "rating", "timestamp")):
    """Write (user, item, rating, time) rows in one of the supported formats."""
    path = Path(path)
    lines = []
    if fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        lines.append(sep.join(header))
        lines += [sep.join(map(str, r)) for r in rows]
    elif fmt == "amazon":
        lines += [",".join(map(str, r)) for r in rows]
    elif fmt == "movielens":
        lines += ["::".join(map(str, r)) for r in rows]
    data = ("\n".join(lines) + "\n").encode()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def prepare_file(path, min_count=5, min_rating=None, **read_kw):
    log = prep.read_log(path, need_rating=min_rating is not None, **read_kw)
    return prep.preprocess(log, min_count=min_count, min_rating=min_rating)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def run_main(capsys, *args):
    """In-process twin of run_cli (no interpreter start-up): main()'s exit code and output."""
    code = prep.main(list(map(str, args)))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    for frag in fragments:
        assert frag in err, err


def reference(rows, min_count, min_rating=None):
    """Plain-Python statement of the preprocessing rules, for comparison.

    rows: (user, item, rating, time) in file order.  Removes one offending
    user or item at a time (a different order from prepare.py's simultaneous
    rounds; the k-core is unique, so the results must agree).  Returns the
    dataset dict, or None when nothing survives.
    """
    user_rank = {}
    for r in rows:
        user_rank.setdefault(str(r[0]), len(user_rank))
    kept = [(pos, str(u), str(i), t) for pos, (u, i, rt, t) in enumerate(rows)
            if min_rating is None or float(rt) >= min_rating]
    kept = _peel(_peel(kept, min_count, min_count), max(min_count, 3), min_count)
    if not kept:
        return None
    by_user = {}
    for pos, u, i, t in kept:
        by_user.setdefault(u, []).append((float(t), pos, i))
    users = sorted(by_user, key=user_rank.__getitem__)
    smap, train, val, test = {}, {}, {}, {}
    for uid, u in enumerate(users):
        seq = [smap.setdefault(i, len(smap) + 1) for _, _, i in sorted(by_user[u])]
        train[uid], val[uid], test[uid] = seq[:-2], [seq[-2]], [seq[-1]]
    return {"train": train, "val": val, "test": test,
            "umap": {u: k for k, u in enumerate(users)}, "smap": smap}


def _peel(kept, min_user, min_item):
    while True:
        uc = Counter(r[1] for r in kept)
        ic = Counter(r[2] for r in kept)
        bad_u = next((u for u, c in uc.items() if c < min_user), None)
        if bad_u is not None:
            kept = [r for r in kept if r[1] != bad_u]
            continue
        bad_i = next((i for i, c in ic.items() if c < min_item), None)
        if bad_i is None:
            return kept
        kept = [r for r in kept if r[2] != bad_i]


def check_invariants(ds, min_count):
    """What always holds for a prepared dataset."""
    n_users, n_items = len(ds["train"]), len(ds["smap"])
    assert list(ds["train"]) == list(range(n_users))
    assert list(ds["val"]) == list(ds["test"]) == list(range(n_users))
    assert sorted(ds["umap"].values()) == list(range(n_users))
    assert sorted(ds["smap"].values()) == list(range(1, n_items + 1))
    full = {u: ds["train"][u] + ds["val"][u] + ds["test"][u] for u in range(n_users)}
    item_count = Counter(x for s in full.values() for x in s)
    assert set(item_count) == set(range(1, n_items + 1))           # no unused id
    assert all(c >= min_count for c in item_count.values())        # item side of the core
    assert all(len(s) >= max(3, min_count) for s in full.values())  # user side (+ >= 3)
    assert all(len(ds["val"][u]) == len(ds["test"][u]) == 1 for u in range(n_users))
    assert all(type(x) is int for s in full.values() for x in s)
    assert all(type(k) is str for k in list(ds["umap"]) + list(ds["smap"]))
    # ids follow first appearance: walking users in order, each new item is max+1
    seen = 0
    for u in range(n_users):
        for x in full[u]:
            assert x <= seen + 1
            seen = max(seen, x)


# ------------------------------------------------------------------- hand-written log

# Columns in an unusual order, found by name (ts, stars, item, user); a quoted
# comment with a comma goes through the csv module.  min_count=2, min_rating=3.
HAND_CSV = """\
ts,stars,item,user,comment
50,5,apple,bob,first
10,4,pear,alice,"hello, world"
20,5,fig,alice,
20,5,kiwi,alice,
5,1,plum,bob,
20,4,apple,alice,
40,5,pear,bob,
50,3,fig,bob,
70,5,kiwi,carol,
80,5,date,carol,
15,5,apple,bob,
90,2,pear,carol,
99,5,lime,dave,
98,5,lime,dave,
97,5,lime,dave,
3,5,pear,erin,
1,5,mango,dave,
4,5,mango,erin,
"""
# Worked out by hand:
# * min_rating 3 drops plum (line 6) and carol's pear (line 13).
# * 2-core: date has 1 row -> gone; carol is left with 1 -> gone; kiwi is left
#   with 1 (alice) -> gone.  Removed: 1 user, 2 items, 3 interactions.
# * users need 3 items: erin (pear, mango) goes; mango is then left with 1
#   (dave) -> gone; dave keeps lime x3.  Removed: 1 user, 1 item, 3 rows.
# * time order, ties in file order: bob apple@15 pear@40 apple@50 fig@50;
#   alice pear@10 fig@20 apple@20; dave lime@97 lime@98 lime@99.
# * users by first appearance: bob 0, alice 1, dave 2; items walking bob,
#   alice, dave: apple 1, pear 2, fig 3, lime 4.
HAND_EXPECTED = {
    "train": {0: [1, 2], 1: [2], 2: [4]},
    "val": {0: [1], 1: [3], 2: [4]},
    "test": {0: [3], 1: [1], 2: [4]},
    "umap": {"bob": 0, "alice": 1, "dave": 2},
    "smap": {"apple": 1, "pear": 2, "fig": 3, "lime": 4},
}
HAND_ROWS = [  # the same log as (user, item, rating, time) rows, for the other formats
    tuple(r[k] for k in (3, 2, 1, 0)) for r in csv.reader(io.StringIO(HAND_CSV))][1:]


def test_hand_written_log(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text(HAND_CSV)
    ds, stats = prepare_file(path, min_count=2, min_rating=3)
    assert ds == HAND_EXPECTED
    f = stats["filters"]
    assert f["rows_read"] == 18
    assert f["min_rating"] == {"threshold": 3, "rows_removed": 2}
    assert f["k_core"] == {"min_count": 2, "iterations": 4, "users_removed": 1,
                           "items_removed": 2, "interactions_removed": 3}
    assert f["short_users"] == {"min_items": 3, "users_removed": 1, "items_removed": 1,
                                "interactions_removed": 3}
    assert (stats["users"], stats["items"], stats["interactions"]) == (3, 4, 10)
    assert stats["train_interactions"] == 4
    assert stats["median_seq_len"] == 3.0
    assert stats["sparsity"] == pytest.approx(1 - 10 / 12, abs=1e-6)
    assert stats["raw"] == {"rows": 18, "users": 5, "items": 8}
    assert stats["options"]["columns"] == {"user": "user", "item": "item", "time": "ts",
                                           "rating": "stars"}
    assert ds == reference(HAND_ROWS, 2, 3)


@pytest.mark.parametrize("fmt,name", [("csv", "log.csv"), ("tsv", "log.tsv"),
                                      ("amazon", "ratings.csv"), ("movielens", "ratings.dat"),
                                      ("csv", "log.csv.gz"), ("movielens", "ratings.dat.gz")])
def test_formats_auto_detected(tmp_path, fmt, name):
    path = write_log(tmp_path / name, HAND_ROWS, fmt)
    log = prep.read_log(path, need_rating=True)
    assert log.info["format"] == fmt
    ds, _ = prep.preprocess(log, min_count=2, min_rating=3)
    assert ds == HAND_EXPECTED


def test_gzip_detected_by_magic_bytes(tmp_path):
    path = tmp_path / "log.txt"               # no .gz suffix
    path.write_bytes(gzip.compress(HAND_CSV.encode()))
    ds, _ = prepare_file(path, min_count=2, min_rating=3)
    assert ds == HAND_EXPECTED


def test_explicit_columns_and_format(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text(HAND_CSV.replace("ts,stars,item,user", "When,Score,Thing,Who"))
    log = prep.read_log(path, fmt="csv", user_col="Who", item_col="thing",
                        time_col="When", rating_col="Score")
    assert prep.preprocess(log, min_count=2, min_rating=3)[0] == HAND_EXPECTED


# ---------------------------------------------------------------- round trip of a split

def make_split(rng, n_users, n_items, k=5):
    """A dataset dict in canonical form that is already a k-core.

    Every item gets >= k slots in a shuffled pool, the pool is cut into user
    sequences of >= k items, and items are renumbered by first appearance.
    """
    pool = [x for x in range(n_items) for _ in range(k + rng.randrange(4))]
    rng.shuffle(pool)
    assert len(pool) >= k * n_users
    lengths = [k] * n_users
    for _ in range(len(pool) - k * n_users):      # spread the rest at random
        lengths[rng.randrange(n_users)] += 1
    ends = np.cumsum(lengths).tolist()
    smap = {}
    seqs = [[smap.setdefault(x, len(smap) + 1) for x in pool[e - n:e]]
            for n, e in zip(lengths, ends)]
    return {"train": {u: s[:-2] for u, s in enumerate(seqs)},
            "val": {u: [s[-2]] for u, s in enumerate(seqs)},
            "test": {u: [s[-1]] for u, s in enumerate(seqs)},
            "umap": {f"user{u}": u for u in range(n_users)},
            "smap": {f"item{x}": new for x, new in smap.items()}}


def emit_log(ds, rng):
    """Rows (user, item, rating, time) whose preparation gives back ``ds``.

    Rows are shuffled, but each user's first row comes after the previous
    user's first row (ids follow first appearance).  Times have ties; tied
    rows keep sequence order in the file.
    """
    inv_s = {v: k for k, v in ds["smap"].items()}
    n_users = len(ds["train"])
    firsts = sorted(rng.random() for _ in range(n_users))
    keyed = []
    for u in range(n_users):
        seq = ds["train"][u] + ds["val"][u] + ds["test"][u]
        times, t = [], rng.randrange(1000)
        for _ in seq:
            t += rng.choice([0, 0, 1, 5, 100])            # many ties
            times.append(t)
        keys = [firsts[u]] + [rng.uniform(firsts[u], 1.0) for _ in seq[1:]]
        rng.shuffle(keys)
        for t in set(times):                             # tied rows: file order = seq order
            idx = [j for j in range(len(seq)) if times[j] == t]
            for j, key in zip(idx, sorted(keys[j] for j in idx)):
                keys[j] = key
        keyed += [(keys[j], (f"user{u}", inv_s[x], 5, times[j])) for j, x in enumerate(seq)]
    keyed.sort(key=lambda kr: kr[0])
    return [r for _, r in keyed]


@pytest.mark.parametrize("seed", range(3))
def test_round_trip_of_known_split(tmp_path, seed):
    rng = random.Random(seed)
    expected = make_split(rng, n_users=40, n_items=60)
    rows = emit_log(expected, rng)
    path = write_log(tmp_path / "log.csv", rows)
    for block_size in (50, 1 << 20):          # many chunks, one chunk
        ds, stats = prepare_file(path, min_count=5, block_size=block_size)
        assert ds == expected
        assert stats["filters"]["k_core"]["interactions_removed"] == 0
        assert stats["interactions"] == len(rows)


# ---------------------------------------------------------------------- property tests

try:
    from hypothesis import HealthCheck, given, settings, strategies as st
except ImportError:                                           # pragma: no cover
    given = None

if given is not None:
    USERS = ["u1", "u2", "u3", "ü4", "u5", "u6", "用户7", "u8"]
    ITEMS = ["a", "b", "c", "d", "é", "f", "g", "h", "i", "j"]

    @st.composite
    def logs(draw, max_rows=120):
        """Random logs, dense enough that the 5-core is often non-empty:
        few users and items, many rows, many timestamp ties."""
        n_users = draw(st.integers(1, len(USERS)))
        n_items = draw(st.integers(1, len(ITEMS)))
        scale = draw(st.sampled_from([1, 0.5]))     # 0.5: float timestamps ("3.0")
        row = st.tuples(st.sampled_from(USERS[:n_users]), st.sampled_from(ITEMS[:n_items]),
                        st.integers(1, 5), st.integers(0, 12).map(lambda t: t * scale))
        n = draw(st.integers(1, max_rows))     # (lists() alone favours short logs)
        return draw(st.lists(row, min_size=n, max_size=n))

    _fmt = st.sampled_from(["csv", "tsv", "amazon", "movielens", "csv.gz"])

    @settings(max_examples=50, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(rows=logs(),
           min_count=st.sampled_from([0, 1, 2, 3, 5]),
           min_rating=st.sampled_from([None, 3]),
           fmt=_fmt, block_size=st.sampled_from([1, 7, 64, 1 << 20]))
    def test_random_logs_match_reference(tmp_path, rows, min_count, min_rating, fmt,
                                         block_size):
        path = write_log(tmp_path / f"log.{fmt}", rows, fmt.split(".")[0])
        expected = reference(rows, min_count, min_rating)
        if expected is None:
            with pytest.raises(PrepareError, match="no interactions left"):
                prepare_file(path, min_count, min_rating, block_size=block_size)
            return
        ds, stats = prepare_file(path, min_count, min_rating, block_size=block_size)
        assert ds == expected
        check_invariants(ds, min_count)
        assert stats["interactions"] == sum(len(s) + 2 for s in ds["train"].values())
        f = stats["filters"]
        removed = (f["min_rating"]["rows_removed"] + f["k_core"]["interactions_removed"]
                   + f["short_users"]["interactions_removed"])
        assert removed + stats["interactions"] == len(rows)

    @settings(max_examples=50, deadline=None)
    @given(rows=logs(),
           min_count=st.sampled_from([0, 1, 2, 3, 4, 5]))
    def test_in_memory_properties(rows, min_count):
        users, items, ratings, times = zip(*rows)
        log = prep.Log.from_records(users, items, times, ratings)
        try:
            ds, _ = prep.preprocess(log, min_count=min_count)
        except PrepareError:
            assert reference(rows, min_count) is None
            return
        check_invariants(ds, min_count)
        # val / test are each user's last two rows by time (ties: file order)
        inv_u = {v: k for k, v in ds["umap"].items()}
        inv_s = {v: k for k, v in ds["smap"].items()}
        for u in ds["train"]:
            mine = [(t, pos, i) for pos, (uu, i, _, t) in enumerate(rows) if uu == inv_u[u]]
            kept = set(inv_s[x] for x in ds["train"][u] + ds["val"][u] + ds["test"][u])
            last_two = [i for _, _, i in sorted(r for r in mine if r[2] in kept)][-2:]
            assert [inv_s[ds["val"][u][0]], inv_s[ds["test"][u][0]]] == last_two


@pytest.mark.parametrize("times", ["small", "huge", "float", "negative"])
def test_order_by_user_time_equals_two_stable_sorts(times):
    rng = np.random.default_rng(7)
    n = 5000
    u = rng.integers(0, 50, n)
    t = {"small": rng.integers(0, 20, n),
         "huge": rng.integers(-2**62, 2**62, n) // 7 * 7,      # no room to pack
         "float": rng.integers(0, 20, n) / 4,
         "negative": rng.integers(-5, 5, n)}[times]
    want = np.argsort(t, kind="stable")
    want = want[np.argsort(u[want], kind="stable")]
    assert np.array_equal(prep.order_by_user_time(u, t), want)


# ------------------------------------------------------------------ parsing edge cases

def test_quoting_crlf_bom_blank_lines_and_chunking(tmp_path):
    plain = write_log(tmp_path / "plain.csv", HAND_ROWS)
    want = prepare_file(plain, 2, 3)[0]
    rows = ['"%s","%s",%s,%s' % r for r in HAND_ROWS]
    rows.insert(3, '"a\nb",x,5,1')    # a quoted newline: one record over two lines
    text = "\ufeffuser_id,item_id,rating,timestamp\r\n\r\n" + "\r\n".join(rows) + "\r\n\r\n"
    path = tmp_path / "fancy.csv"
    path.write_bytes(text.encode())
    for block_size in (1, 5, 33, 1 << 20):
        ds = prepare_file(path, 2, 3, block_size=block_size)[0]
        # the extra user "a\nb" has one row and is filtered; the rest is unchanged
        assert ds == want, block_size


@pytest.mark.parametrize("fmt", ["amazon", "movielens", "tsv"])
def test_blank_lines_and_crlf_without_quoting(tmp_path, fmt):
    want = prepare_file(write_log(tmp_path / "plain", HAND_ROWS, fmt), 2, 3)[0]
    path = tmp_path / "messy"
    lines = write_log(path, HAND_ROWS, fmt).read_text().splitlines()
    lines.insert(len(lines) // 2, "   ")
    path.write_bytes(("\r\n".join(lines) + "\r\n\n").encode())
    for block_size in (1, 9, 1 << 20):
        assert prepare_file(path, 2, 3, block_size=block_size)[0] == want


def test_float_and_date_timestamps(tmp_path):
    rows = [(u, i, 5, t) for u, i, t in [
        ("x", "a", 1.5), ("x", "b", 1.25), ("x", "c", 2), ("y", "a", 0.5), ("y", "c", 9e9),
        ("y", "b", 3)]]
    ds, stats = prepare_file(write_log(tmp_path / "f.csv", rows), min_count=0)
    assert ds["train"][0] + ds["val"][0] + ds["test"][0] == [1, 2, 3]     # b, a, c
    assert stats["options"]["timestamps"] == "number"
    dates = [("x", "a", 5, "2020-01-02"), ("x", "b", 5, "2020-01-01T10:00:00"),
             ("x", "c", 5, "2021-06-01 00:00:01")]
    ds, stats = prepare_file(write_log(tmp_path / "d.csv", dates), min_count=0)
    assert ds["smap"] == {"b": 1, "a": 2, "c": 3}
    assert stats["options"]["timestamps"] == "date"


def test_generated_log_across_chunks(tmp_path):
    path = tmp_path / "gen.csv"
    generate_log(path, n_rows=20_000, n_users=800, n_items=300, seed=1)
    ds, stats = prepare_file(path, min_count=5)
    check_invariants(ds, 5)
    # the fast path (whole chunks) and tiny chunks give the same result
    assert prepare_file(path, min_count=5, block_size=997)[0] == ds
    assert stats["raw"]["rows"] == 20_000


# ----------------------------------------------------------------------------- output

class _NoGlobals(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"global {module}.{name}")


def test_cli_writes_loadable_dataset(tmp_path):
    src = tmp_path / "log.csv"
    src.write_text(HAND_CSV)
    proc = run_cli(src, "--name", "hand", "--data_dir", tmp_path / "data", "--min_count", "2",
                   "--min_rating", "3", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == proc.stderr == ""
    out = tmp_path / "data" / "hand"
    assert sorted(p.name for p in out.iterdir()) == ["dataset.pkl", "stats.json"]
    with open(out / "dataset.pkl", "rb") as f:
        assert _NoGlobals(f).load() == HAND_EXPECTED        # plain types only
    stats = json.loads((out / "stats.json").read_text())
    assert stats["name"] == "hand" and stats["input"] == str(src.resolve())
    assert stats["options"]["min_rating"] == 3 and stats["users"] == 3
    # the project's own loader accepts it (what main.py --dataset hand uses)
    assert load_dataset("hand", str(tmp_path / "data"), download=False) == HAND_EXPECTED


def test_default_output_folder_is_in_the_repository():
    assert prep.DEFAULT_DATA_DIR == ROOT / "datasets" / "data"


def test_failed_write_keeps_old_dataset(tmp_path):
    ds, stats = prep.preprocess(prep.Log.from_records("aaabbb", "xyzxyz", range(6)), 0)
    prep.write_dataset(ds, stats, tmp_path)
    before = (tmp_path / "dataset.pkl").read_bytes()
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("fails halfway through the write")
    with pytest.raises(RuntimeError, match="fails halfway"):  # raised while the new file is being written
        prep.write_dataset({"train": Unpicklable()}, stats, tmp_path, overwrite=True)
    assert (tmp_path / "dataset.pkl").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.pkl", "stats.json"]
    with pytest.raises(PrepareError, match="already exists; pass --overwrite"):
        prep.write_dataset(ds, stats, tmp_path)


# -------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("text,fragment", [
    ("", "is empty"),
    ("\n\n", "is empty"),
    ("user_id,item_id,timestamp\n", "no interaction rows"),
    ("user_id,item,rating\nu,i,1\n", "no time column found in the header"),
    ("a,b,c,d\nu,i,5,1\n", "no user column"),
    ("user_id,item_id,timestamp\nu,i,1\nu,i\n", "line 3: expected 3 fields, found 2"),
    ("user_id,item_id,timestamp\nu,i,1\n\nu,i,x1\n", "line 4: cannot parse timestamp 'x1'"),
    ("user_id,item_id,timestamp\nu,i,2020-01-01\nu,i,soon\n", "line 3: cannot parse timestamp"),
    ("user_id,item_id,timestamp\nu,i,1\nu,i,nan\n", "line 3: cannot parse timestamp"),
    ("u1,i1,5,100\nu1,i2,5,101\nu1,i3,5\n", "line 3: expected 4 fields, found 3"),
    ("1::2::5::100\n1::3::5::x\n", "line 2: cannot parse timestamp 'x'"),
    ("user_id,item_id,timestamp\nu,i,1\nu,\"i,1\n", "line 3: expected 3 fields, found 2"),
    ("just some words\n", "cannot tell the input format"),
])
def test_bad_input_is_one_clear_error(tmp_path, text, fragment):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(PrepareError) as e:
        prepare_file(path, min_count=0)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_rating_and_missing_rating_column(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("user_id,item_id,rating,timestamp\nu,i,5,1\nu,j,great,2\n")
    with pytest.raises(PrepareError, match="line 3: cannot parse rating"):
        prepare_file(path, min_count=0, min_rating=3)
    path.write_text("user_id,item_id,timestamp\nu,i,1\n")
    with pytest.raises(PrepareError, match="no rating column"):
        prepare_file(path, min_count=0, min_rating=3)
    with pytest.raises(PrepareError, match=r"'stars' \(--rating_col\) is not in the header"):
        prep.read_log(path, rating_col="stars")
    with pytest.raises(PrepareError, match="min_rating needs a rating column"):
        prep.preprocess(prep.read_log(path), min_count=0, min_rating=3)
    path.write_text("user_id,item_id,rating,timestamp\nu,i,1,1\nu,j,2,2\nu,k,1,3\n")
    with pytest.raises(PrepareError, match=r"no interactions left .*min_rating=4"):
        prepare_file(path, min_count=0, min_rating=4)


def test_truncated_gzip(tmp_path):
    path = tmp_path / "log.csv.gz"
    path.write_bytes(gzip.compress(HAND_CSV.encode() * 50)[:-30])
    with pytest.raises(PrepareError, match="cannot decompress"):
        prepare_file(path)


def test_cli_errors_are_one_line(tmp_path, capsys):
    # A real process: exit code 2, one stderr line, no traceback.
    src = tmp_path / "log.csv"
    src.write_text("user,item,time\nu1,i1,5\nu1,i2\n")
    assert_one_line_error(run_cli(src, "--name", "x", "--data_dir", tmp_path),
                          "line 3: expected 3 fields, found 2")
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    assert_one_line_error(run_cli(empty, "--name", "x", "--data_dir", tmp_path), "is empty")
    # The same path in-process (main() is what the script runs).
    assert_one_line_error(run_main(capsys, src, "--name", "x", "--data_dir", tmp_path,
                                   "--time_col", "ts"), "'ts' (--time_col) is not in the header")
    assert_one_line_error(run_main(capsys, tmp_path / "missing.csv", "--name", "x",
                                   "--data_dir", tmp_path), "cannot open")
    assert_one_line_error(run_main(capsys, src, "--name", "../y", "--data_dir", tmp_path),
                          "plain directory name")
    # main.py refuses a leading dot (--dataset .x), so prepare.py refuses to make one
    assert_one_line_error(run_main(capsys, src, "--name", ".x", "--data_dir", tmp_path),
                          "invalid dataset name '.x'")
    assert not (tmp_path / "x").exists()


def test_cli_nothing_survives_and_existing_output(tmp_path, capsys):
    src = write_log(tmp_path / "log.csv", HAND_ROWS)
    assert_one_line_error(run_main(capsys, src, "--name", "x", "--data_dir", tmp_path),
                          "no interactions left after filtering", "--min_count")
    ok = run_main(capsys, src, "--name", "x", "--data_dir", tmp_path, "--min_count", "2")
    assert ok.returncode == 0, ok.stderr
    assert "python main.py --dataset x" in ok.stdout
    before = (tmp_path / "x" / "dataset.pkl").read_bytes()
    assert_one_line_error(run_cli(src, "--name", "x", "--data_dir", tmp_path, "--min_count", "3"),
                          "already exists; pass --overwrite")
    assert (tmp_path / "x" / "dataset.pkl").read_bytes() == before
    again = run_main(capsys, src, "--name", "x", "--data_dir", tmp_path, "--min_count", "3",
                     "--overwrite", "--quiet")
    assert again.returncode == 0, again.stderr
    stats = json.loads((tmp_path / "x" / "stats.json").read_text())
    assert stats["options"]["min_count"] == 3


# ------------------------------------------------------------ RecBole's atomic .inter file

def _load_export(name="to_recbole"):
    # As when it runs as a script, its own folder (where prepare.py lies) is on the path.
    if str(ROOT / "datasets") not in sys.path:
        sys.path.append(str(ROOT / "datasets"))
    spec = importlib.util.spec_from_file_location(f"diffurec_{name}", ROOT / "datasets" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


to_recbole = _load_export()

# Item ids not in first-appearance order, and user 0 takes item 2 twice.
SMALL = {"train": {0: [2, 3], 1: [1]}, "val": {0: [2], 1: [3]}, "test": {0: [1], 1: [2]},
         "umap": {"ann": 0, "bob": 1}, "smap": {"x": 1, "y": 2, "z": 3}}
# Worked out by hand: users ascending, train + val + test, timestamp = row number.
SMALL_INTER = ("user_id:token\titem_id:token\ttimestamp:float\n"
               "0\t2\t0\n0\t3\t1\n0\t2\t2\n0\t1\t3\n"
               "1\t1\t4\n1\t3\t5\n1\t2\t6\n")
# Its import: tokens "2", "3", "1" first appear in this order, so they become items 1, 2, 3.
SMALL_IMPORTED = {"train": {0: [1, 2], 1: [3]}, "val": {0: [1], 1: [2]}, "test": {0: [3], 1: [1]},
                  "umap": {"0": 0, "1": 1}, "smap": {"2": 1, "3": 2, "1": 3}}


def _put_dataset(folder, name, dataset):
    (folder / name).mkdir(parents=True)
    with open(folder / name / "dataset.pkl", "wb") as f:
        pickle.dump(dataset, f, protocol=4)


def _in_exported_ids(ds):
    """train/val/test of an imported dataset, its items written as the exported tokens (old ids)."""
    token = {v: int(k) for k, v in ds["smap"].items()}
    return {key: {int(u): [token[x] for x in ds[key][ds["umap"][u]]] for u in ds["umap"]}
            for key in ("train", "val", "test")}


def test_export_writes_the_expected_inter_text(tmp_path, capsys):
    _put_dataset(tmp_path / "data", "small", SMALL)
    code = to_recbole.main(["small", "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "rb")])
    out, err = capsys.readouterr()
    assert code == 0, err
    path = tmp_path / "rb" / "small" / "small.inter"
    assert path.read_bytes() == SMALL_INTER.encode()
    assert out == f"wrote {path}: 2 users, 3 items, 7 interactions\n"
    assert "".join(prep.inter_lines(SMALL)) == SMALL_INTER


def test_inter_import_round_trip(tmp_path):
    path = tmp_path / "small.inter"
    path.write_text("".join(prep.inter_lines(SMALL)))
    log = prep.read_log(path)
    assert log.info["format"] == "recbole"
    assert log.info["columns"] == {"user": "user_id:token", "item": "item_id:token",
                                   "time": "timestamp:float"}
    ds, stats = prep.preprocess(log, min_count=0)
    assert ds == SMALL_IMPORTED
    assert _in_exported_ids(ds) == {k: SMALL[k] for k in ("train", "val", "test")}
    assert stats["interactions"] == 7


def test_inter_round_trip_of_amazon_beauty(tmp_path, real_data_dir):
    path, users, items, rows = to_recbole.export("amazon_beauty", real_data_dir, tmp_path)
    assert (users, items, rows) == (22363, 12101, 198502)
    ds, stats = prepare_file(path, min_count=5)          # a 5-core already: nothing is removed
    assert stats["interactions"] == rows
    original = load_dataset("amazon_beauty", str(real_data_dir), download=False)
    # its items are numbered by first appearance, so even the ids come back unchanged
    assert all(ds[k] == original[k] for k in ("train", "val", "test"))
    assert ds["smap"] == {str(i): i for i in range(1, items + 1)}


def test_inter_columns_in_any_order_extra_columns_ignored(tmp_path):
    path = tmp_path / "log.inter"
    rows = ["rating:float\ttimestamp:float\treview:token_seq\titem_id:token\tuser_id:token"]
    rows += [f"{r}\t{t}\tgood buy\t{i}\t{u}" for u, i, r, t in HAND_ROWS]
    path.write_text("\n".join(rows) + "\n")
    assert prep.detect_format(path.read_bytes().splitlines()[0]) == "recbole"
    ds, _ = prepare_file(path, min_count=2, min_rating=3)
    assert ds == HAND_EXPECTED
    assert prep.read_log(path, fmt="recbole", need_rating=True).info["columns"]["rating"] == "rating:float"


def test_inter_float_timestamps_and_plain_tsv_detection(tmp_path):
    path = tmp_path / "f.inter"
    path.write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                    "u\ta\t2.5\nu\tb\t1e0\nu\tc\t3\n")
    ds, _ = prepare_file(path, min_count=0)
    assert ds["smap"] == {"b": 1, "a": 2, "c": 3}
    assert prep.detect_format(b"user_id\titem_id\ttimestamp\n") == "tsv"
    assert prep.detect_format(b"user_id:token\titem_id\ttimestamp:float\n") == "recbole"


NEEDS = "a RecBole .inter file needs user_id:token, item_id:token, timestamp:float"


@pytest.mark.parametrize("text,fragments", [
    ("user_id:token\titem_id:token\nu\ta\n",
     ["no time column found in the header (user_id, item_id); pass --time_col", NEEDS]),
    ("user_id:token\ttimestamp:float\nu\t1\n", ["no item column found", NEEDS]),
    ("user_id:token\titem_id:token\ttimestamp:float\nu\ta\t1\nu\tb\tsoon\n",
     ["line 3: cannot parse timestamp 'soon' (column 'timestamp:float'); "
      "timestamp:float holds numbers; fix or remove that line"]),
    ("user_id:token\titem_id:token\ttimestamp:float\nu\ta\t2020-01-01\n",
     ["line 2: cannot parse timestamp '2020-01-01'", "holds numbers"]),
    ("user_id:token\titem_id:token\ttimestamp:float\nu\ta\t1\nu\tb\n",
     ["line 3: expected 3 fields, found 2"]),
    ("user_id:token\titem_id:token\ttimestamp:token\nu\ta\t1\n",
     ["column 'timestamp:token' is the time column, whose type must be float; "
      "change the header to timestamp:float"]),
    ("user_id:token\titem_id:float\ttimestamp:float\nu\t1\t1\n",
     ["change the header to item_id:token"]),
    ("user_id:token\titem_id\ttimestamp:float\nu\ta\t1\n",
     ["header field 'item_id' is not name:type"]),
])
def test_bad_inter_input_is_one_clear_error(tmp_path, capsys, text, fragments):
    path = tmp_path / "bad.inter"
    path.write_text(text)
    assert_one_line_error(run_main(capsys, path, "--name", "x", "--data_dir", tmp_path,
                                   "--min_count", "0"), *fragments)
    assert not (tmp_path / "x").exists()


def run_export(capsys, *args):
    """to_recbole.main's exit code and output, in-process (its start-up would import torch)."""
    code = to_recbole.main(list(map(str, args)))
    return subprocess.CompletedProcess(args, code, *capsys.readouterr())


def test_export_errors_are_one_line(tmp_path, capsys):
    _put_dataset(tmp_path / "data", "small", SMALL)
    args = ["small", "--data_dir", tmp_path / "data", "--out_dir", tmp_path / "rb", "--quiet"]
    ok = run_export(capsys, *args)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
    target = tmp_path / "rb" / "small" / "small.inter"
    target.write_text("old")
    assert_one_line_error(run_export(capsys, *args), "small.inter already exists; pass --overwrite")
    assert target.read_text() == "old"
    assert run_export(capsys, *args, "--overwrite").returncode == 0
    assert target.read_text() == SMALL_INTER
    assert_one_line_error(run_export(capsys, "nothing", "--data_dir", tmp_path),
                          "nothing", "no download is known")
    assert_one_line_error(run_export(capsys, "../small", "--data_dir", tmp_path / "data"),
                          "plain directory name")
    _put_dataset(tmp_path / "data", "broken", {**SMALL, "val": {0: [2]}})
    assert_one_line_error(run_export(capsys, "broken", "--data_dir", tmp_path / "data"),
                          "user ids differ between 'train' and 'val'")
    # a shortened flag is refused, not expanded, and a bad flag is one line too
    assert_one_line_error(run_export(capsys, *args, "--over"), "unrecognized arguments: --over")
    assert target.read_text() == SMALL_INTER


def test_recbole_config_matches_the_sasrec_defaults():
    """datasets/recbole_sasrec.yaml sets RecBole's knobs to what main.py --model sasrec uses."""
    import config
    cfg = {}
    for line in (ROOT / "datasets" / "recbole_sasrec.yaml").read_text().splitlines():
        key, sep, value = line.split("#")[0].partition(":")
        if sep and key.strip() and value.strip():      # its keys are unique at every level
            cfg[key.strip()] = value.strip()
    ours = vars(config.resolve(["--dataset", "x", "--model", "sasrec"]))
    assert {k: cfg[k] for k in ("loss_type", "order", "mode", "split")} == \
        {"loss_type": "CE", "order": "TO", "mode": "full", "split": "{LS: valid_and_test}"}
    pairs = {"MAX_ITEM_LIST_LENGTH": "max_len", "n_layers": "num_blocks", "n_heads": "heads",
             "hidden_size": "hidden_size", "hidden_dropout_prob": "dropout", "attn_dropout_prob": "dropout",
             "train_batch_size": "batch_size", "learning_rate": "lr", "weight_decay": "weight_decay",
             "epochs": "epochs", "eval_step": "eval_interval", "stopping_step": "patience",
             "seed": "random_seed"}
    assert {k: float(cfg[k]) for k in pairs} == {k: float(ours[v]) for k, v in pairs.items()}
    assert (cfg["hidden_act"], int(cfg["inner_size"])) == (ours["hidden_act"], 4 * ours["hidden_size"])
    assert cfg["filter_inter_by_user_or_item"] == "False" and cfg["rm_dup_inter"] == "~"
    assert cfg["data_path"] == "datasets/recbole/" == \
        to_recbole.DEFAULT_OUT_DIR.relative_to(ROOT).as_posix() + "/"


def test_recbole_check_without_recbole_or_its_inputs_is_one_line(monkeypatch, capsys, tmp_path):
    """datasets/recbole_check.py runs in RecBole's own environment: elsewhere, or with a missing config, it
    says so in one line (exit 2) before any work, and reads the time limit as main.py does."""
    check = _load_export("recbole_check")
    monkeypatch.setitem(sys.modules, "recbole", None)  # as in an environment without RecBole: import fails
    assert check.main(["amazon_beauty"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "RecBole is not installed" in err and "requirements-recbole.txt" in err
    monkeypatch.setitem(sys.modules, "recbole", type(sys)("recbole"))  # present
    assert check.main(["amazon_beauty", "--config", str(tmp_path / "none.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --config {tmp_path / 'none.yaml'}: no such file"
    assert check.main(["amazon_beauty", "--time_limit", "soon"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--time_limit" in err and "\n" not in err
    assert check.DEFAULT_CONFIG == ROOT / "datasets" / "recbole_sasrec.yaml"


def test_recbole_check_scores_recboles_rows_with_this_projects_metrics():
    """The RecBole check's test also ranks the very score rows RecBole ranks with metrics.py: row 0's target
    (item 3) is second, row 1's (item 2) first; the padding column is -inf as RecBole sets it."""
    import torch
    check = _load_export("recbole_check")
    scores = torch.tensor([[-math.inf, 3.0, 1.0, 2.0], [-math.inf, 0.0, 5.0, 1.0]])
    sums, n = check.target_sums(scores, torch.tensor([0, 1]), torch.tensor([3, 2]), [1, 2])
    assert n == 2 and torch.allclose(sums, torch.tensor([1.0, 2.0, 1.0, 1.0 + 1 / math.log2(3)], dtype=sums.dtype))
    with pytest.raises(ValueError, match="exactly one target item"):
        check.target_sums(scores, torch.tensor([0, 0]), torch.tensor([3, 2]), [1])

    class Collector:  # RecBole's protocol: evaluate() hands every batch's scores to eval_batch_collect
        def __init__(self):
            self.seen = 0

        def eval_batch_collect(self, scores, interaction, positive_u, positive_i):
            self.seen += 1

    class Trainer:
        def __init__(self):
            self.eval_collector = Collector()
            self.evaluator = type("Evaluator", (), {"metric_class": {"hit": type("Hit", (), {"decimal_place": 4})()}})

        def evaluate(self, batches, load_best_model, show_progress):
            for s, u, i in batches:
                self.eval_collector.eval_batch_collect(s, None, u, i)
            return {"hit@2": 0.75}

    trainer = Trainer()
    batches = [(scores, torch.tensor([0, 1]), torch.tensor([3, 2])),  # ranks 2, 1
               (scores[:1], torch.tensor([0]), torch.tensor([2]))]    # rank 3
    result, ours = check.test_both_ways(trainer, batches, [2])
    assert result == {"hit@2": 0.75} and trainer.eval_collector.seen == 2  # RecBole's own collection still ran
    assert ours == {"HR@2": 66.6667, "NDCG@2": round(100 * (1 / math.log2(3) + 1) / 3, 4)}  # over 3 users
    assert "eval_batch_collect" not in vars(trainer.eval_collector)  # the class's method again
    assert trainer.evaluator.metric_class["hit"].decimal_place == 12  # the test's figures unrounded


def test_recbole_check_turns_off_the_anomaly_detection_that_recbole_turns_on(monkeypatch, tmp_path):
    """RecBole 1.2.1's model package runs torch.autograd.set_detect_anomaly(True) when imported; the check's
    import of SASRec turns it off again (it doubles a training step). A stand-in package on sys.path does what
    RecBole's import does, so the suite needs no RecBole."""
    import torch
    package = tmp_path / "recbole" / "model" / "sequential_recommender"
    package.mkdir(parents=True)
    (tmp_path / "recbole" / "__init__.py").write_text("")
    (tmp_path / "recbole" / "model" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("import torch\ntorch.autograd.set_detect_anomaly(True)\n"
                                         "ON_AFTER_IMPORT = torch.is_anomaly_enabled()\nclass SASRec:\n    pass\n")
    for name in [m for m in sys.modules if m == "recbole" or m.startswith("recbole.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    check = _load_export("recbole_check")
    try:
        sasrec = check.recbole_sasrec()
        assert sys.modules["recbole.model.sequential_recommender"].ON_AFTER_IMPORT is True
        assert sasrec is sys.modules["recbole.model.sequential_recommender"].SASRec
        assert torch.is_anomaly_enabled() is False
    finally:
        torch.autograd.set_detect_anomaly(False)
        for name in [m for m in sys.modules if m == "recbole" or m.startswith("recbole.")]:
            del sys.modules[name]


# ----------------------------------------------------------- generator for benchmarks

_B36 = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)


def _digits(values, width, base, alphabet):
    """Fixed-width digits of non-negative ints as a (n, width) uint8 matrix."""
    out = np.empty((len(values), width), dtype=np.uint8)
    v = np.asarray(values, dtype=np.int64).copy()
    for k in range(width - 1, -1, -1):
        out[:, k] = alphabet[v % base]
        v //= base
    return out


def generate_log(path, n_rows, n_users=None, n_items=None, seed=0, chunk=1_000_000):
    """Write an Amazon-like CSV log: header user_id,item_id,rating,timestamp.

    Users look like 'A0000ABC123XYZ' (lognormal activity), items like
    'B00ABC1234' (Zipf-like popularity), ratings 1-5 (mostly 4-5), Unix-second
    timestamps in random order.  Rows are built as a byte matrix, so 10
    million rows take seconds.  A '.gz' path is written gzip-compressed.
    """
    rng = np.random.default_rng(seed)
    n_users = n_users or max(1, n_rows // 25)
    n_items = n_items or max(1, n_rows // 100)
    # distinct tokens: the index times an odd prime stays far below 36**digits
    utok = np.hstack([np.full((n_users, 1), ord("A"), np.uint8),
                      _digits(np.arange(n_users) * 7919 + 10**12, 13, 36, _B36)])
    itok = np.hstack([np.frombuffer(b"B0" * n_items, np.uint8).reshape(n_items, 2),
                      _digits(np.arange(n_items) * 7907 + 10**10, 8, 36, _B36)])
    p_user = rng.lognormal(0.0, 1.0, n_users)
    p_item = rng.permutation(1.0 / np.arange(1, n_items + 1) ** 0.9)
    p_user, p_item = p_user / p_user.sum(), p_item / p_item.sum()
    decimal = np.frombuffer(b"0123456789", dtype=np.uint8)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(b"user_id,item_id,rating,timestamp\n")
        for start in range(0, n_rows, chunk):
            n = min(chunk, n_rows - start)
            row = np.empty((n, 41), dtype=np.uint8)   # 14+1+10+1+3+1+10+1 bytes
            row[:, 0:14] = utok[rng.choice(n_users, n, p=p_user)]
            row[:, 15:25] = itok[rng.choice(n_items, n, p=p_item)]
            row[:, [14, 25, 29]] = ord(",")
            row[:, 26] = ord("1") + rng.choice(5, n, p=[0.05, 0.05, 0.1, 0.25, 0.55])
            row[:, 27:29] = np.frombuffer(b".0", np.uint8)
            row[:, 30:40] = _digits(rng.integers(1_000_000_000, 1_600_000_000, n), 10, 10,
                                    decimal)
            row[:, 40] = ord("\n")
            f.write(row.tobytes())


def _main(argv):
    import argparse
    p = argparse.ArgumentParser(description="helpers of the prepare.py tests")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("make-log", help="write a generated Amazon-like CSV log")
    g.add_argument("path")
    g.add_argument("--rows", type=int, default=10_000_000)
    g.add_argument("--users", type=int)
    g.add_argument("--items", type=int)
    g.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    generate_log(a.path, a.rows, a.users, a.items, a.seed)


if __name__ == "__main__":
    _main(sys.argv[1:])
