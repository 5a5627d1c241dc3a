"""Data: everything from a dataset file on disk to the sample tensors the models train and are tested on.

* ``load_dataset(name)`` returns the dataset dict (keys ``train``, ``val``, ``test``, ``umap``, ``smap``;
  datasets/README.md gives the format), downloading the authors' file on first use (verified against its
  git blob id) and reading it with an unpickler that cannot import anything.
* ``build_samples(data)`` makes the left-padded training / validation / test samples of the reference,
  ``sequence_samples(data)`` SASRec's one-sequence-per-user training rows, ``histories(data, split)`` the
  items to exclude from each ranking, and ``group_users(data)`` the hot/cold and sequence-length groups of
  the ``--long_head`` analysis.
* ``make_synthetic()`` is a small learnable dataset for trying the pipeline; ``load_item_categories``
  reads the category file of the diversity metrics.

Every dataset problem is raised as ``DataError`` whose message is one line naming the file, the problem
and the fix. Nothing happens at import time.
"""

import csv
import hashlib
import http.client
import json
import os
import pickle
import tempfile
import urllib.request
from itertools import chain

import numpy as np
import torch
from tqdm import tqdm

# The default --data_dir: datasets/data beside this file, wherever the command is run from.
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'datasets', 'data')


class DataError(Exception):
    """A dataset problem; str(e) is one line naming the file, the problem and the fix."""


# ---------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------

# The authors' repository (WHUIR/DiffuRec) pinned at one commit, so that the
# bytes behind a URL can never change under us; every file is checked against
# its git blob id, which GitHub shows for the file at that commit.
REPO_COMMIT = 'f6f70c9d78477591742c71c9ed83e5f1269530e8'
_DEFAULT_BASE_URL = ('https://raw.githubusercontent.com/WHUIR/DiffuRec/'
                     f'{REPO_COMMIT}/datasets/data')
# A base URL under which ``<name>/dataset.pkl`` lives (a mirror, a local
# http.server in tests, or a file:// directory).
DATA_URL_ENV = 'DIFFUREC_DATA_URL'

DATASETS = {
    'amazon_beauty': dict(
        blob='54cfcb98f62b427630621239de13244b81df6c1a',
        sha256='1d5ba224ff02584bcde37d3dd9fd3191d440829e7fcb7fe42dcfd313dd2144cb'),
    'toys': dict(
        blob='8c197ed390d4f8cae54ebb16d48eb29be46f4c11',
        sha256='e6e8f7f188326a3370749055e2a736fbd16ac036f42fe051ebd8eb891ff7bd4a'),
    'ml-1m': dict(
        blob='2d771a1d620e331011a839751396662891ea5534',
        sha256='24517f75352c088e6163b0f1a1d61932390c08d837e191e02d09d1d35dc63ea4'),
    # Larger than 4 MiB and not mirrored here: only the blob id is known.
    'steam': dict(blob='87f513897b29e59945bae8c7475c92b1144f21ea', sha256=None),
}

_SAMPLE_KEYS = ('train', 'val', 'test', 'umap', 'smap')


def _one_line(text):
    """Collapse whitespace so an error message stays on one line."""
    return ' '.join(str(text).split())


def check_name(name, flag='--dataset'):
    """Reject dataset names that would escape ``data_dir`` (e.g. '../x'); flag: the flag that gave it."""
    if (not isinstance(name, str) or not name or name.startswith('.')
            or '/' in name or '\\' in name or os.sep in name):
        raise DataError(f"invalid dataset name {name!r} ({flag}): use a plain directory name such as "
                        f"'amazon_beauty' (known: {', '.join(DATASETS)}, synthetic)")


def check_downloadable(name, dest_path):
    """A missing dataset file is an error before any work unless a download of it is known."""
    if name not in DATASETS:
        raise DataError(f"{dest_path}: file is missing and no download is known for dataset "
                        f"{name!r} (downloadable: {', '.join(DATASETS)}); put a dataset.pkl "
                        f"there yourself, e.g. one made by datasets/prepare.py, or fix --dataset "
                        f"or --data_dir (see datasets/README.md)")


def check_available(name, data_dir):
    """What load_dataset(name, data_dir) needs, checked before any work: a valid name, and its dataset.pkl
    in the folder data_dir, or a known download of it. DataError (one line) otherwise."""
    if name == 'synthetic':
        return
    check_name(name)
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"--data_dir {data_dir} is a file; give the folder holding <dataset>/dataset.pkl")
    path = os.path.join(data_dir, name, 'dataset.pkl')
    if not os.path.isfile(path):
        check_downloadable(name, os.path.abspath(path))


def dataset_url(name):
    """URL of ``<name>/dataset.pkl``: the pinned GitHub commit, or $DIFFUREC_DATA_URL."""
    base = os.environ.get(DATA_URL_ENV) or _DEFAULT_BASE_URL
    return f"{base.rstrip('/')}/{name}/dataset.pkl"


def git_blob_id(data):
    """Git's object id of a file's content: sha1(b"blob <size>\\0" + data)."""
    return hashlib.sha1(b'blob %d\0' % len(data) + bytes(data)).hexdigest()


def _file_digests(path, chunk=1 << 20):
    """(git blob id, sha256) of a file, read in chunks."""
    blob = hashlib.sha1(b'blob %d\0' % os.path.getsize(path))
    sha = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            blob.update(block)
            sha.update(block)
    return blob.hexdigest(), sha.hexdigest()


# ---------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------

def download_dataset(name, dest_path, url=None, timeout=30):
    """Download dataset ``name`` to ``dest_path`` and verify it.

    The bytes go to a temporary file next to ``dest_path`` and are moved into
    place (atomically, ``os.replace``) only after the git blob id (and the
    sha256, where known) matched, so a failed or corrupted download never leaves
    a file that a later run would trust.  Raises DataError on any failure.
    """
    dest_path = os.path.abspath(dest_path)
    check_downloadable(name, dest_path)
    url = url or dataset_url(name)
    expected = DATASETS[name]
    manual = (f"without network access, download {url} elsewhere and place it at "
              f"{dest_path} (see datasets/README.md)")
    dest_dir = os.path.dirname(dest_path)
    try:
        os.makedirs(dest_dir, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(
            prefix=f'.{os.path.basename(dest_path)}.', suffix='.part', dir=dest_dir)
    except OSError as e:
        raise DataError(f"{dest_path}: cannot write to {dest_dir} ({_one_line(e)}); "
                        f"choose a writable --data_dir") from e

    done = False
    try:
        with os.fdopen(fd, 'wb') as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    size = resp.headers.get('Content-Length')
                    with tqdm(total=int(size) if size and size.isdigit() else None,
                              unit='B', unit_scale=True, unit_divisor=1024,
                              desc=f'downloading {name}', leave=False) as bar:
                        for block in iter(lambda: resp.read(1 << 16), b''):
                            out.write(block)
                            bar.update(len(block))
            except (OSError, ValueError, http.client.HTTPException) as e:
                # URLError / HTTPError / timeouts are OSErrors; a malformed
                # URL is a ValueError; a cut connection an HTTPException.
                reason = getattr(e, 'reason', None) or e
                raise DataError(f"could not download dataset {name!r} from {url} "
                                f"({_one_line(reason)}); {manual}") from e
        blob, sha = _file_digests(tmp_path)
        if blob != expected['blob']:
            raise DataError(f"downloaded {url} but its git blob id is {blob}, expected "
                            f"{expected['blob']} (corrupt or wrong file; nothing was saved); "
                            f"retry, or {manual}")
        if expected['sha256'] is not None and sha != expected['sha256']:
            raise DataError(f"downloaded {url} but its sha256 is {sha}, expected "
                            f"{expected['sha256']} (nothing was saved); retry, or {manual}")
        os.replace(tmp_path, dest_path)
        done = True
    finally:
        if not done:
            try:
                os.remove(tmp_path)
            except FileNotFoundError:
                pass


# ---------------------------------------------------------------------------
# Safe loading and validation
# ---------------------------------------------------------------------------

class _NoGlobalsUnpickler(pickle.Unpickler):
    """An unpickler that can build only pickle's built-in types.

    Every way a pickle can run code (REDUCE, NEWOBJ, INST, BUILD on a class,
    extension codes) first needs a callable obtained through ``find_class``;
    refusing every lookup therefore leaves only dicts, lists, tuples, sets,
    strings, numbers, booleans and None (plus bytes, rejected afterwards).
    """

    def __init__(self, file, path):
        super().__init__(file)
        self._path = path

    def find_class(self, module, name):
        raise DataError(f"{self._path}: refuses to import module {module!r} (global {name!r}); "
                        f"a dataset pickle may hold only dicts, lists and ints; rebuild it "
                        f"with datasets/prepare.py or download the original")

    def persistent_load(self, pid):
        raise DataError(f"{self._path}: refuses a persistent reference; a dataset pickle may "
                        f"hold only dicts, lists and ints; rebuild it with datasets/prepare.py")


_SCALARS = (int, str, float, bool, type(None))
_CONTAINERS = (dict, list, tuple, set, frozenset)


def _check_plain(obj, path):
    """Raise DataError unless obj is built only from _CONTAINERS and _SCALARS."""
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind in _SCALARS:
            continue
        if kind not in _CONTAINERS:
            raise DataError(f"{path}: holds a {kind.__name__} object; a dataset pickle may hold "
                            f"only dicts, lists, tuples, sets, ints and strings")
        if id(item) in seen:  # shared or self-referencing containers
            continue
        seen.add(id(item))
        children = chain(item.keys(), item.values()) if kind is dict else item
        # Scalars are by far the most common children (item ids); skip them
        # here instead of pushing a million ints onto the stack.
        stack.extend(c for c in children if type(c) not in _SCALARS)


def load_pickle_safely(path):
    """Unpickle ``path`` without importing anything; DataError if unsafe or unreadable."""
    try:
        with open(path, 'rb') as f:
            obj = _NoGlobalsUnpickler(f, path).load()
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found; place dataset.pkl there "
                        f"(see datasets/README.md)") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({_one_line(e)}); check the path and "
                        f"its permissions") from e
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... from bad bytes
        raise DataError(f"{path}: not a readable pickle, corrupt or truncated "
                        f"({type(e).__name__}: {_one_line(e)}); delete it and download "
                        f"it again or rebuild it with datasets/prepare.py") from e
    _check_plain(obj, path)
    return obj


def validate_dataset(data, source):
    """Check the structure of a dataset dict; DataError naming ``source``.

    train/val/test: dicts with the same user keys 0..n_users-1; train[u] a
    non-empty list of ints, val[u] and test[u] lists of exactly one int; every
    item id in 1..len(smap) (0 is padding); umap a bijection from the original
    user ids onto 0..n_users-1, smap one from the original item ids onto 1..n_items.
    """
    fix = 'fix the file or rebuild it with datasets/prepare.py'

    def fail(problem):
        raise DataError(f"{source}: {problem}; {fix}")

    if not isinstance(data, dict):
        fail(f"expected a dict with keys {'/'.join(_SAMPLE_KEYS)}, got {type(data).__name__}")
    missing = [k for k in _SAMPLE_KEYS if k not in data]
    if missing:
        fail(f"missing key(s) {', '.join(map(repr, missing))} (needs {'/'.join(_SAMPLE_KEYS)})")
    for key in _SAMPLE_KEYS:
        if not isinstance(data[key], dict):
            fail(f"{key!r} must be a dict, got {type(data[key]).__name__}")
    train, val, test = data['train'], data['val'], data['test']

    n_users = len(train)
    if n_users == 0:
        fail("'train' has no users")
    bad_keys = [k for k in train if type(k) is not int or not 0 <= k < n_users]
    if bad_keys:  # with n_users distinct keys, all in range means exactly 0..n-1
        fail(f"user ids of 'train' must be the ints 0..{n_users - 1}, found {bad_keys[0]!r}")
    for key, split in (('val', val), ('test', test)):
        if split.keys() != train.keys():
            extra = sorted(map(repr, split.keys() - train.keys()))
            lost = sorted(train.keys() - split.keys())
            detail = (f"user {lost[0]} is in 'train' but not in {key!r}" if lost
                      else f"user {extra[0]} is in {key!r} but not in 'train'")
            fail(f"user ids differ between 'train' and {key!r}: {detail}")

    n_items = len(data['smap'])
    if n_items == 0:
        fail("'smap' is empty, so there are no items")
    # The id maps turn results back into the dataset's original ids: each must be a bijection.
    for key, first, count, what in (('umap', 0, n_users, 'users'), ('smap', 1, n_items, 'items')):
        values = data[key].values()
        if len(data[key]) != count or any(type(v) is not int for v in values) \
                or set(values) != set(range(first, first + count)):
            fail(f"{key!r} must map the {count} original {what} one-to-one onto the ids "
                 f"{first}..{first + count - 1}")
    for u in range(n_users):
        seq = train[u]
        if type(seq) is not list or not seq:
            fail(f"train[{u}] must be a non-empty list of item ids, got {seq!r:.60}")
        if any(type(x) is not int for x in seq):
            odd = next(x for x in seq if type(x) is not int)
            fail(f"train[{u}] holds {odd!r:.40} ({type(odd).__name__}), item ids must be ints")
        lo, hi = min(seq), max(seq)
        if lo < 1 or hi > n_items:
            fail(f"train[{u}] holds item id {lo if lo < 1 else hi}, outside 1..{n_items} "
                 f"(n_items = len(smap); 0 is padding)")
        for key, split in (('val', val), ('test', test)):
            one = split[u]
            if type(one) is not list or len(one) != 1 or type(one[0]) is not int:
                fail(f"{key}[{u}] must be a list of exactly one int item id, got {one!r:.60}")
            if not 1 <= one[0] <= n_items:
                fail(f"{key}[{u}] holds item id {one[0]}, outside 1..{n_items} "
                     f"(n_items = len(smap); 0 is padding)")


def load_dataset(name, data_dir=DEFAULT_DATA_DIR, download=True):
    """Load and validate ``data_dir/name/dataset.pkl`` ('synthetic': make_synthetic()).

    A missing file is downloaded (and verified) when ``download`` is true,
    otherwise DataError names the path to put it at.
    """
    if name == 'synthetic':
        return make_synthetic()
    check_name(name)
    path = os.path.join(data_dir, name, 'dataset.pkl')
    if not os.path.isfile(path):
        if not download:
            where = f" (source: {dataset_url(name)})" if name in DATASETS else ''
            raise DataError(f"{path}: dataset file not found and downloading is off; place "
                            f"dataset.pkl there{where} or allow the download "
                            f"(see datasets/README.md)")
        download_dataset(name, path)
    data = load_pickle_safely(path)
    validate_dataset(data, source=path)
    return data


# ---------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------

# Share of steps that follow the hidden successor rule; the rest jump to a
# uniformly random item, so the model cannot simply memorise whole sequences.
_SYNTHETIC_FOLLOW = 0.9


def make_synthetic(n_users=400, n_items=200, seed=0):
    """A small deterministic dataset in the dataset.pkl format, with a learnable pattern.

    All items lie on one hidden cycle (a random permutation); each next item is
    the successor of the previous one with probability 0.9, otherwise a random
    item.  Train sequences have 5..20 items, plus one val and one test item, so
    a working model reaches HR@10 near 0.9 where chance is 10 / n_items.
    """
    if n_users < 1 or n_items < 2:
        raise ValueError('make_synthetic needs n_users >= 1 and n_items >= 2')
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_items) + 1
    successor = np.zeros(n_items + 1, dtype=np.int64)  # successor[i] for item i
    successor[order] = np.roll(order, -1)
    train, val, test = {}, {}, {}
    for u in range(n_users):
        length = int(rng.integers(5, 21)) + 2  # train part + val + test
        seq = [int(rng.integers(1, n_items + 1))]
        for _ in range(length - 1):
            if rng.random() < _SYNTHETIC_FOLLOW:
                seq.append(int(successor[seq[-1]]))
            else:
                seq.append(int(rng.integers(1, n_items + 1)))
        train[u], val[u], test[u] = seq[:-2], [seq[-2]], [seq[-1]]
    return dict(train=train, val=val, test=test,
                umap={u: u for u in range(n_users)},
                smap={i: i for i in range(1, n_items + 1)})


# ---------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------

def _pack_full_sequences(data, max_len):
    """Lay all full sequences (train + val + test) out in one padded int64 array.

    Each user's sequence is preceded by ``max_len`` zeros, so the window of the
    ``max_len`` positions before any position of that user is exactly the
    left-padded history: no per-sample Python work is needed.
    Returns (packed (P,), start (n,), train_len (n,)) where start[u] is the
    position of user u's first item.
    """
    if not (isinstance(max_len, int) and max_len >= 1):
        raise ValueError(f'max_len must be a positive int, got {max_len!r}')
    train, val, test = data['train'], data['val'], data['test']
    n = len(train)
    users = range(n)  # users ascending, whatever the dict order
    train_len = np.fromiter((len(train[u]) for u in users), dtype=np.int64, count=n)
    full_len = train_len + 2
    total = int(full_len.sum())
    flat = np.fromiter(chain.from_iterable(chain(train[u], val[u], test[u]) for u in users),
                       dtype=np.int64, count=total)
    gaps = max_len * np.arange(1, n + 1, dtype=np.int64)  # zeros before user u's items
    start = gaps + np.concatenate(([0], np.cumsum(full_len)[:-1]))
    packed = np.zeros(total + max_len * n, dtype=np.int64)
    packed[np.arange(total) + np.repeat(gaps, full_len)] = flat
    return packed, start, train_len


def _rows(packed, ends, max_len):
    """(len(ends), max_len) inputs: the max_len packed entries just before each end.

    ``ends`` is also where each label sits; returns (inputs, labels) as LongTensors.
    """
    windows = np.lib.stride_tricks.sliding_window_view(packed, max_len)
    inputs = windows[ends - max_len]  # fancy indexing copies: contiguous (N, L)
    labels = packed[ends]
    return torch.from_numpy(inputs.reshape(len(ends), max_len)), torch.from_numpy(labels)


def build_samples(data, max_len=50):
    """The reference's training, validation and test samples.

    Returns {'train' | 'val' | 'test': (inputs LongTensor (N, max_len),
    labels LongTensor (N,))}.  Train: for every user (ascending) and k = 2..len(s),
    s = train[u]: left-pad(s[:k-1]) -> s[k-1].  Val: left-pad(train[u]) -> val[u][0].
    Test: left-pad(train[u] + val[u]) -> test[u][0].  Left-pad keeps the last
    max_len items and prepends zeros.
    """
    packed, start, train_len = _pack_full_sequences(data, max_len)
    # Label positions of the training samples: start[u] + 1 .. start[u] + len - 1.
    per_user = train_len - 1
    n_train = int(per_user.sum())
    first = np.concatenate(([0], np.cumsum(per_user)[:-1]))
    train_ends = (np.arange(n_train, dtype=np.int64) - np.repeat(first, per_user)
                  + np.repeat(start + 1, per_user))
    val_ends = start + train_len
    return {
        'train': _rows(packed, train_ends, max_len),
        'val': _rows(packed, val_ends, max_len),
        'test': _rows(packed, val_ends + 1, max_len),
    }


def samples_checksum(inputs, labels):
    """First 16 hex digits of sha256 over the int64 rows ``input ++ [label]``, concatenated."""
    x = inputs.cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
    y = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f'expected inputs (N, L) and labels (N,), got {x.shape} and {y.shape}')
    digest = hashlib.sha256()
    step = 65536  # rows per chunk: hashing ml-1m must not double its 400 MB in memory
    for i in range(0, x.shape[0], step):
        rows = np.concatenate([x[i:i + step], y[i:i + step, None]], axis=1)
        digest.update(np.ascontiguousarray(rows, dtype='<i8').tobytes())
    return digest.hexdigest()[:16]


def full_history_inputs(data, max_len=50):
    """The input to recommend from: left-pad(train[u] + val[u] + test[u]) for every user u ascending.

    Returns a LongTensor (n_users, max_len): each user's whole known history, its last max_len items.
    """
    packed, start, train_len = _pack_full_sequences(data, max_len)
    windows = np.lib.stride_tricks.sliding_window_view(packed, max_len)
    ends = start + train_len + 2  # one past each user's last item
    return torch.from_numpy(windows[ends - max_len].reshape(len(ends), max_len))


def sequence_samples(data, max_len=50):
    """SASRec's training rows: one per user with at least two training items, input left-pad(train[u][:-1])
    -> targets left-pad(train[u][1:]), users ascending.

    SASRec learns from every position of a history at once, so it needs one row per user rather than one
    per prefix. Returns (inputs, targets), both LongTensor (n_rows, max_len): position j of a row predicts
    targets[j] from inputs[:j + 1]; 0 marks padding in both, and every row has at least one target. Only the
    last max_len transitions of each sequence are kept. The validation and test items never appear: they
    are not in train[u].
    """
    sequences = [data['train'][u][-(max_len + 1):] for u in range(len(data['train']))]
    sequences = [s for s in sequences if len(s) > 1]
    inputs = np.zeros((len(sequences), max_len), dtype=np.int64)
    targets = np.zeros((len(sequences), max_len), dtype=np.int64)
    for row, seq in enumerate(sequences):
        n = len(seq) - 1
        inputs[row, max_len - n:] = seq[:-1]
        targets[row, max_len - n:] = seq[1:]
    return torch.from_numpy(inputs), torch.from_numpy(targets)


# The parts of a user's sequence that come before the item each split predicts.
_HISTORY_PARTS = {'val': ('train',), 'test': ('train', 'val'), 'all': ('train', 'val', 'test')}


def histories(data, split):
    """Every item each user interacted with before the item that `split` predicts, users ascending.

    'val': train[u]; 'test' (and the --long_head groups, which predict the test item): train[u] + val[u];
    'all' (--recommend, which predicts the item after the test item): train[u] + val[u] + test[u].
    Returns a list of lists of item ids, whole histories (not cut to max_len): what --exclude_history
    removes from each ranking.
    """
    if split not in _HISTORY_PARTS:
        raise ValueError(f'unknown split {split!r}; choose one of {", ".join(_HISTORY_PARTS)}')
    parts = [data[key] for key in _HISTORY_PARTS[split]]
    return [[item for part in parts for item in part[u]] for u in range(len(data['train']))]


def load_item_categories(path, smap):
    """Item categories from a JSON or CSV file keyed by the dataset's ORIGINAL item ids (the keys of smap).

    ``.json``: {"<item id>": "category"} or {"<item id>": ["category", ...]}. Any other name is CSV: rows
    ``item,category``, one row per (item, category) pair; a first row ``item,category`` is a header.
    Items the dataset does not have are ignored; an item listed nowhere has no category.
    Returns (categories BoolTensor (len(smap) + 1, C), row i = the categories of item i and row 0 (padding)
    empty; names, the C category names sorted). DataError when unreadable or when no item matches.
    """
    try:
        if path.lower().endswith('.json'):
            with open(path, encoding='utf-8') as f:
                raw = json.load(f)
            if not isinstance(raw, dict):
                raise DataError(f"{path}: expected a JSON object {{item id: category}}, got "
                                f"{type(raw).__name__}; see docs/recommendations.md")
            pairs = [(str(item), str(c)) for item, cats in raw.items()
                     for c in (cats if isinstance(cats, list) else [cats])]
        else:
            with open(path, newline='', encoding='utf-8') as f:
                rows = [r for r in csv.reader(f) if r]
            if rows and [c.strip().lower() for c in rows[0]] == ['item', 'category']:
                rows = rows[1:]
            bad = next((i for i, r in enumerate(rows) if len(r) != 2), None)
            if bad is not None:
                raise DataError(f"{path}: row {rows[bad]!r:.60} has {len(rows[bad])} fields, expected "
                                f"2 (item,category)")
            pairs = [(item.strip(), c.strip()) for item, c in rows]
    except OSError as e:
        raise DataError(f"{path}: cannot read the category file ({_one_line(e)}); check "
                        f"--category_file") from e
    except (ValueError, csv.Error) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"{path}: not a readable JSON or CSV category file ({type(e).__name__}: "
                        f"{_one_line(e)[:100]})") from e
    new_id = {str(k): v for k, v in smap.items()}
    known = [(new_id[item], c) for item, c in pairs if item in new_id]
    if not known:
        raise DataError(f"{path}: none of its {len(pairs)} entries names an item of the dataset; keys must "
                        f"be the original item ids (the keys of smap), e.g. {next(iter(new_id), '?')!r}")
    names = sorted({c for _, c in known})
    column = {c: j for j, c in enumerate(names)}
    categories = torch.zeros(len(smap) + 1, len(names), dtype=torch.bool)
    items, cols = zip(*((i, column[c]) for i, c in known))
    categories[torch.tensor(items), torch.tensor(cols)] = True
    return categories, names


# Group names of the --long_head analysis, in report order.
POPULARITY_GROUPS = ('hot', 'cold')
LENGTH_GROUPS = ('short', 'mid_short', 'mid', 'mid_long', 'long')


def group_users(data, max_len=50):
    """Users split for the ``--long_head`` analysis, as the paper's group study.

    Full sequence f = train + val + test; each user gives one sample
    left-pad(f[:-1]) -> f[-1] (users ascending within a group).
    hot / cold: the count of the test item over all full sequences is >= / <
    the 80th percentile of the counts of the items that occur.
    short .. long: len(f) <= 20th, <= 40th, <= 60th, <= 80th percentile of the
    lengths, else long.  Returns {group: (inputs LongTensor (n_g, max_len),
    labels LongTensor (n_g,), users LongTensor (n_g,))}; a group may be empty
    (shape (0, max_len)).
    Users are indexed by their key, never by position, so it works for every
    dataset (the reference's ml-1m off-by-one cannot happen).
    """
    packed, start, train_len = _pack_full_sequences(data, max_len)
    full_len = train_len + 2
    inputs, labels = _rows(packed, start + full_len - 1, max_len)

    counts = np.bincount(packed)  # padding zeros only land in counts[0]
    counts[0] = 0
    split = np.percentile(counts[counts > 0], 80)
    hot = counts[labels.numpy()] >= split

    # searchsorted(side='left') gives i with thresholds[i-1] < len <= thresholds[i].
    thresholds = np.percentile(full_len, [20, 40, 60, 80])
    length_group = np.searchsorted(thresholds, full_len, side='left')

    masks = dict(zip(POPULARITY_GROUPS, (hot, ~hot)))
    masks.update({name: length_group == i for i, name in enumerate(LENGTH_GROUPS)})
    users = torch.arange(len(labels))
    return {name: (inputs[torch.from_numpy(mask)], labels[torch.from_numpy(mask)], users[torch.from_numpy(mask)])
            for name, mask in masks.items()}
