"""Shared helpers for the DiffuRec reproduction.

Data: where the datasets come from, how they are fetched and checked, and how
they are turned into the tensors the model trains on. Run time: seeding and RNG
state, the allocator, device choice, gathering across processes, the run log.

* ``load_dataset(name)`` returns the pickled dict of DIFFUREC_SPEC.md section 1
  (keys ``train``, ``val``, ``test``, ``umap``, ``smap``), downloading the
  authors' file on first use (verified against its git blob id) and reading it
  with an unpickler that cannot import anything.
* ``build_samples(data)`` makes the left-padded training / validation / test
  samples (section 1); ``group_users(data)`` makes the hot/cold and
  sequence-length groups of the ``--long_head`` analysis (section 6).
* ``make_synthetic()`` is a tiny learnable dataset for smoke tests.

Every dataset problem is raised as ``DataError`` whose message is one line naming
the file, the problem and the fix.  Nothing happens at import time.
"""

import csv
import hashlib
import http.client
import json
import os
import pickle
import random
import tempfile
import urllib.request
from itertools import chain

import numpy as np
import torch
from tqdm import tqdm


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


def _check_name(name):
    """Reject dataset names that would escape ``data_dir`` (e.g. '../x')."""
    if (not isinstance(name, str) or not name or name.startswith('.')
            or '/' in name or '\\' in name or os.sep in name):
        raise DataError(f"invalid dataset name {name!r}: use a plain directory name such as "
                        f"'amazon_beauty' (known: {', '.join(DATASETS)}, synthetic)")


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
    if name not in DATASETS:
        raise DataError(f"{dest_path}: file is missing and no download is known for dataset "
                        f"{name!r} (downloadable: {', '.join(DATASETS)}); put a dataset.pkl "
                        f"there yourself, e.g. one made by datasets/prepare.py "
                        f"(see datasets/README.md)")
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
    """Check the structure of DIFFUREC_SPEC.md section 1; DataError naming ``source``.

    train/val/test: dicts with the same user keys 0..n_users-1; train[u] a
    non-empty list of ints, val[u] and test[u] lists of exactly one int; every
    item id in 1..len(smap) (0 is padding).
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


def load_dataset(name, data_dir='datasets/data', download=True):
    """Load and validate ``data_dir/name/dataset.pkl`` ('synthetic': make_synthetic()).

    A missing file is downloaded (and verified) when ``download`` is true,
    otherwise DataError names the path to put it at.
    """
    if name == 'synthetic':
        return make_synthetic()
    _check_name(name)
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
    """Training, validation and test samples of DIFFUREC_SPEC.md section 1.

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
                                f"{type(raw).__name__}; see README, 'Diversity'")
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
    """Users split for the ``--long_head`` analysis (DIFFUREC_SPEC.md section 6).

    Full sequence f = train + val + test; each user gives one sample
    left-pad(f[:-1]) -> f[-1] (users ascending within a group).
    hot / cold: the count of the test item over all full sequences is >= / <
    the 80th percentile of the counts of the items that occur.
    short .. long: len(f) <= 20th, <= 40th, <= 60th, <= 80th percentile of the
    lengths, else long.  Returns {group: (inputs LongTensor (n_g, max_len),
    labels LongTensor (n_g,))}; a group may be empty (shape (0, max_len)).
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
    return {name: (inputs[torch.from_numpy(mask)], labels[torch.from_numpy(mask)])
            for name, mask in masks.items()}


# ----------------------------------------------------------------------------------------------------------
# Run-time helpers: seeding and RNG state, memory, device choice, processes, the run log
# ----------------------------------------------------------------------------------------------------------

def set_seed(seed):
    """Seed every generator in play: python, numpy, torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def rng_state():
    """Every generator's state, in types that torch.load(weights_only=True) accepts."""
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': [version, list(keys), gauss],
             'numpy': [kind, torch.from_numpy(np_keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             'torch': torch.get_rng_state(), 'cuda': []}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    version, keys, gauss = state['python']
    random.setstate((version, tuple(keys), gauss))
    kind, np_keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, np_keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def keep_freed_memory():
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    By default every block over 32 MiB (an FFN activation at the defaults is 52 MB) is mapped anew at each
    allocation and unmapped when freed, so it is paid again in page faults each time: the 52 MB output of the
    first feed-forward product takes 37 ms instead of 20 ms, and a CPU training step at the amazon_beauty
    defaults about 8% longer (five alternated processes each). The price: the process never shrinks.
    Linux with glibc only; returns whether the setting took.
    """
    import ctypes
    import ctypes.util
    import platform
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from <malloc.h>
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def choose_device(name='auto', local_rank=0):
    """'auto' -> cuda if available else cpu; 'cuda' under torchrun -> this process's GPU."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda'):
        if not torch.cuda.is_available():
            raise ValueError(f'--device {name} asked for, but this torch has no CUDA device; use --device cpu or auto')
        if name == 'cuda':
            name = f'cuda:{local_rank}'
        index = torch.device(name).index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f'--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible')
        torch.cuda.set_device(index)
    elif name != 'cpu':
        raise ValueError(f'unknown --device {name!r}; use auto, cpu, cuda or cuda:N')
    return torch.device(name)


def config_dict(cfg):
    """A JSON-able copy of a config namespace (or dict)."""
    items = cfg.items() if isinstance(cfg, dict) else vars(cfg).items()
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in items}


def all_gather_varlen(x):
    """Concatenate 1-D tensors of possibly different lengths from every process, in rank order."""
    import torch.distributed as dist
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=x.dtype, device=x.device)
    padded[:len(x)] = x
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])


def torchrun_env():
    """(rank, world_size, local_rank) of this process from torchrun's environment; (0, 1, 0) without it."""
    if 'WORLD_SIZE' not in os.environ:
        return 0, 1, 0
    try:
        return int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ.get('LOCAL_RANK', 0))
    except (KeyError, ValueError):
        raise ValueError('WORLD_SIZE is set but RANK is missing or not a number: start several processes with '
                         'torchrun (see README, "Several GPUs"), or unset WORLD_SIZE') from None


def init_distributed(device, rank, world):
    """Join the process group that torchrun announced: NCCL between GPUs, gloo between CPU processes."""
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', rank=rank, world_size=world)


def end_distributed():
    """Leave the process group, if this process is in one."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def from_rank0(make, rank, world):
    """make() run on rank 0 only, its value sent to every process (a collective with several processes).

    A ValueError raised by make() is raised on every process, so that none waits for the others forever.
    """
    if world == 1:
        return make()
    import torch.distributed as dist
    box = [None]
    if rank == 0:
        try:
            box[0] = ('value', make())
        except ValueError as e:
            box[0] = ('error', str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == 'error':
        raise ValueError(value)
    return value


class RunLog:
    """Prints a line (without breaking progress bars) and appends it to the run's log files."""

    def __init__(self, paths=(), enabled=True):
        self.paths = [p for p in paths if p]
        self.enabled = enabled

    def __call__(self, message):
        if not self.enabled:
            return
        tqdm.write(message)
        for path in self.paths:
            with open(path, 'a') as f:
                f.write(message + '\n')


def plot_curves(path, epoch_losses, validations, names, kept_epoch=None):
    """Training curves to a PNG at `path`: the mean training loss per epoch (left) and the validation
    metrics `names` per validation (right), the kept epoch marked. epoch_losses: one float per epoch
    (epoch 0 first); validations: dicts with 'epoch' and each name (Trainer.history).

    Draws with matplotlib's Agg backend (no display, global backend untouched). Returns False, and
    writes nothing, when matplotlib is not installed (it is optional).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(11, 4), layout='constrained')
    FigureCanvasAgg(fig)
    loss_ax, metric_ax = fig.subplots(1, 2)
    loss_ax.plot(range(len(epoch_losses)), epoch_losses, marker='.')
    loss_ax.set(xlabel='epoch', ylabel='mean training loss', title='training loss')
    epochs = [v['epoch'] for v in validations]
    for name in names:
        metric_ax.plot(epochs, [v[name] for v in validations], marker='o', label=name)
    metric_ax.set(xlabel='epoch', ylabel='percent', title='validation')
    for ax in (loss_ax, metric_ax):
        if kept_epoch is not None:
            ax.axvline(kept_epoch, color='grey', linestyle='--', linewidth=1, label=f'kept (epoch {kept_epoch})')
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    if validations:
        metric_ax.legend(fontsize='small')
    fig.savefig(path, dpi=100)
    return True
