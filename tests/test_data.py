"""Tests of data.py: provenance and download, safe loading and validation, samples, checksums, user groups."""

import copy
import functools
import hashlib
import http.server
import os
import pickle
import socket
import threading
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from data import DataError
from data import histories, DATASETS, DATA_URL_ENV, REPO_COMMIT, build_samples, dataset_url, download_dataset, git_blob_id, group_users, load_dataset, load_pickle_safely, make_synthetic, samples_checksum, validate_dataset

REAL = ['amazon_beauty', 'toys', 'ml-1m']

# name: (users, items, interactions, shortest train seq, training samples at max_len 50)
COUNTS = {
    'amazon_beauty': (22363, 12101, 198502, 3, 131413),
    'toys': (19412, 11924, 167597, 3, 109361),
    'ml-1m': (6040, 3706, 1000209, 18, 982089),
}
# name: checksums of train, val, test
CHECKSUMS = {
    'amazon_beauty': ('30c683a3e49577ab', '2cb4f477bb314c19', '9e41cfd6164b6012'),
    'toys': ('54734fb949dd6019', 'd71276f5223f2d17', 'bb33e676908b3457'),
    'ml-1m': ('476dce2ee6145995', '2dde39005c031dc1', 'd49b97f5d96d7d12'),
}


@functools.lru_cache(maxsize=None)
def _load_real(data_dir, name):
    # Cached: several tests read the same (read-only) dataset.
    return load_dataset(name, data_dir=data_dir, download=False)


@pytest.fixture
def real(real_data_dir):
    return lambda name: _load_real(str(real_data_dir), name)


def tiny_dataset():
    """A valid 3-user, 5-item dataset for structure tests."""
    return dict(train={0: [1, 2, 3], 1: [4, 5], 2: [2]},
                val={0: [4], 1: [1], 2: [3]},
                test={0: [5], 1: [2], 2: [4]},
                umap={10: 0, 11: 1, 12: 2},
                smap={i: i for i in range(1, 6)})


# ---------------------------------------------------------------------------
# Naive reference implementations (straight from the spec's wording)
# ---------------------------------------------------------------------------

def left_pad(seq, max_len):
    seq = list(seq)[-max_len:]
    return [0] * (max_len - len(seq)) + seq


def naive_samples(data, max_len):
    out = {'train': ([], []), 'val': ([], []), 'test': ([], [])}
    for u in range(len(data['train'])):
        s = data['train'][u]
        for k in range(2, len(s) + 1):
            out['train'][0].append(left_pad(s[:k - 1], max_len))
            out['train'][1].append(s[k - 1])
        out['val'][0].append(left_pad(s, max_len))
        out['val'][1].append(data['val'][u][0])
        out['test'][0].append(left_pad(s + data['val'][u], max_len))
        out['test'][1].append(data['test'][u][0])
    return {k: (np.array(x, dtype=np.int64).reshape(-1, max_len), np.array(y, dtype=np.int64))
            for k, (x, y) in out.items()}


def naive_groups(data, max_len):
    full = {u: data['train'][u] + data['val'][u] + data['test'][u]
            for u in range(len(data['train']))}
    counts = Counter(i for seq in full.values() for i in seq)
    split = np.percentile(list(counts.values()), 80)
    lengths = [len(full[u]) for u in sorted(full)]
    p20, p40, p60, p80 = np.percentile(lengths, [20, 40, 60, 80])
    groups = {g: ([], []) for g in ('hot', 'cold', 'short', 'mid_short', 'mid', 'mid_long', 'long')}
    for u in sorted(full):
        seq = full[u]
        sample = (left_pad(seq[:-1], max_len), seq[-1])
        pop = 'hot' if counts[data['test'][u][0]] >= split else 'cold'
        n = len(seq)
        size = ('short' if n <= p20 else 'mid_short' if n <= p40 else 'mid' if n <= p60
                else 'mid_long' if n <= p80 else 'long')
        for g in (pop, size):
            groups[g][0].append(sample[0])
            groups[g][1].append(sample[1])
    return {g: (np.array(x, dtype=np.int64).reshape(-1, max_len), np.array(y, dtype=np.int64))
            for g, (x, y) in groups.items()}


@st.composite
def datasets(draw):
    n_items = draw(st.integers(1, 8))
    n_users = draw(st.integers(1, 7))
    item = st.integers(1, n_items)
    train, val, test = {}, {}, {}
    for u in range(n_users):
        train[u] = draw(st.lists(item, min_size=1, max_size=12))
        val[u], test[u] = [draw(item)], [draw(item)]
    return dict(train=train, val=val, test=test, umap={u: u for u in range(n_users)},
                smap={i: i for i in range(1, n_items + 1)})


# ---------------------------------------------------------------------------
# Real datasets: provenance, counts, checksums
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('name', REAL)
def test_data_file_matches_pinned_blob_id_and_sha256(real_data_dir, name):
    data = (real_data_dir / name / 'dataset.pkl').read_bytes()
    assert git_blob_id(data) == DATASETS[name]['blob']
    assert hashlib.sha256(data).hexdigest() == DATASETS[name]['sha256']


def test_git_blob_id_matches_git():
    # Values printed by `git hash-object` for an empty file and for "hello\n".
    assert git_blob_id(b'') == 'e69de29bb2d1d6434b8b29ae775ad8c2e48c5391'
    assert git_blob_id(b'hello\n') == 'ce013625030ba8dba906f756967f9e9ca394464a'


def test_datasets_table():
    assert set(DATASETS) == {'amazon_beauty', 'toys', 'ml-1m', 'steam'}
    assert DATASETS['steam'] == dict(blob='87f513897b29e59945bae8c7475c92b1144f21ea',
                                           sha256=None)


@pytest.mark.parametrize('name', REAL)
def test_dataset_counts(real, name):
    data = real(name)
    users, items, interactions, shortest, _ = COUNTS[name]
    assert len(data['train']) == users
    assert len(data['smap']) == items
    assert sum(len(data[k][u]) for k in ('train', 'val', 'test') for u in data['train']) \
        == interactions
    assert min(len(s) for s in data['train'].values()) == shortest


@pytest.mark.parametrize('name', REAL)
def test_sample_counts_and_checksums(real, name):
    data = real(name)
    samples = build_samples(data, max_len=50)
    users, n_train = COUNTS[name][0], COUNTS[name][4]
    for split, n in (('train', n_train), ('val', users), ('test', users)):
        inputs, labels = samples[split]
        assert inputs.dtype == labels.dtype == torch.int64
        assert inputs.shape == (n, 50) and labels.shape == (n,)
    got = tuple(samples_checksum(*samples[s]) for s in ('train', 'val', 'test'))
    assert got == CHECKSUMS[name]


@settings(max_examples=60, deadline=None, database=None)
@given(data=datasets(), max_len=st.integers(1, 6))
def test_build_samples_matches_spec_wording(data, max_len):
    validate_dataset(data, 'hypothesis')
    got = build_samples(data, max_len=max_len)
    want = naive_samples(data, max_len)
    for split in ('train', 'val', 'test'):
        np.testing.assert_array_equal(got[split][0].numpy(), want[split][0])
        np.testing.assert_array_equal(got[split][1].numpy(), want[split][1])
        assert samples_checksum(*got[split]) == \
            samples_checksum(torch.from_numpy(want[split][0]), want[split][1])


def test_samples_checksum_definition():
    inputs = torch.tensor([[0, 1], [2, 3]])
    labels = torch.tensor([4, 5])
    raw = np.array([0, 1, 4, 2, 3, 5], dtype='<i8').tobytes()
    assert samples_checksum(inputs, labels) == hashlib.sha256(raw).hexdigest()[:16]


# ---------------------------------------------------------------------------
# Group analysis
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['ml-1m', 'amazon_beauty'])
def test_group_users_partitions_users(real, name):
    data = real(name)
    n_users = len(data['train'])
    groups = group_users(data, max_len=50)
    assert set(groups) == {'hot', 'cold', 'short', 'mid_short', 'mid', 'mid_long', 'long'}
    assert len(groups['hot'][1]) + len(groups['cold'][1]) == n_users
    assert sum(len(groups[g][1]) for g in ('short', 'mid_short', 'mid', 'mid_long', 'long')) \
        == n_users
    # Same multiset of test labels in both partitions, and every input ends with
    # the user's val item (full sequence minus the test item).
    test_items = sorted(data['test'][u][0] for u in range(n_users))
    for part in (('hot', 'cold'), ('short', 'mid_short', 'mid', 'mid_long', 'long')):
        labels = torch.cat([groups[g][1] for g in part])
        assert sorted(labels.tolist()) == test_items
    assert groups['hot'][0].shape[1] == 50


@settings(max_examples=60, deadline=None, database=None)
@given(data=datasets(), max_len=st.integers(1, 6))
def test_group_users_matches_spec_wording(data, max_len):
    got = group_users(data, max_len=max_len)
    want = naive_groups(data, max_len)
    for g in want:
        assert got[g][0].shape == (len(want[g][1]), max_len)
        np.testing.assert_array_equal(got[g][0].numpy(), want[g][0])
        np.testing.assert_array_equal(got[g][1].numpy(), want[g][1])


def test_group_users_empty_groups_have_shape():
    # All sequences the same length: every length percentile is equal, so all
    # users are 'short' and the other length groups are empty.
    data = tiny_dataset()
    data['train'] = {0: [1, 2], 1: [3, 4], 2: [5, 1]}
    groups = group_users(data, max_len=7)
    assert len(groups['short'][1]) == 3
    for g in ('mid_short', 'mid', 'mid_long', 'long'):
        assert groups[g][0].shape == (0, 7) and groups[g][1].shape == (0,)
        assert groups[g][0].dtype == torch.int64


# ---------------------------------------------------------------------------
# Restricted unpickler
# ---------------------------------------------------------------------------

class _Payload:
    """Unpickling this would create a directory: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


class _Plain:
    pass


def test_unpickler_rejects_global_reference(tmp_path):
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps({'train': os.system}))
    with pytest.raises(DataError, match='refuses to import module') as err:
        load_pickle_safely(path)
    assert str(path) in str(err.value)
    # Protocol 0 uses the GLOBAL opcode instead of STACK_GLOBAL.
    path.write_bytes(b'cos\nsystem\n(S"echo pwned"\ntR.')
    with pytest.raises(DataError, match="refuses to import module 'os'"):
        load_pickle_safely(path)


def test_unpickler_never_runs_reduce_payload(tmp_path):
    marker = tmp_path / 'code_ran'
    path = tmp_path / 'evil.pkl'
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        path.write_bytes(pickle.dumps([1, _Payload(str(marker))], protocol=protocol))
        with pytest.raises(DataError, match='refuses to import module'):
            load_pickle_safely(path)
        assert not marker.exists()


def test_unpickler_rejects_class_instance(tmp_path):
    path = tmp_path / 'obj.pkl'
    path.write_bytes(pickle.dumps({'x': _Plain()}))
    with pytest.raises(DataError, match='refuses to import module'):
        load_pickle_safely(path)


def test_unpickler_rejects_bytes_but_accepts_plain_types(tmp_path):
    path = tmp_path / 'bytes.pkl'
    path.write_bytes(pickle.dumps({'train': [b'raw']}))
    with pytest.raises(DataError, match='bytes'):
        load_pickle_safely(path)
    obj = {'a': [1, 2.5, None, True], 'b': (1, 'x'), 'c': {3, 4}, 'd': frozenset([5])}
    path.write_bytes(pickle.dumps(obj))
    assert load_pickle_safely(path) == obj


def test_unpickler_corrupt_and_truncated(tmp_path, real_data_dir):
    good = (real_data_dir / 'toys' / 'dataset.pkl').read_bytes()
    path = tmp_path / 'dataset.pkl'
    for raw in (good[:len(good) // 2], good[:1], b'', b'\x00garbage\xff' * 10, b'hello world'):
        path.write_bytes(raw)
        with pytest.raises(DataError, match='corrupt or truncated') as err:
            load_pickle_safely(path)
        assert str(path) in str(err.value) and '\n' not in str(err.value)


def test_unpickler_missing_file(tmp_path):
    with pytest.raises(DataError, match='not found'):
        load_pickle_safely(tmp_path / 'nope.pkl')


# ---------------------------------------------------------------------------
# validate_dataset
# ---------------------------------------------------------------------------

def test_validate_accepts_tiny_and_synthetic():
    validate_dataset(tiny_dataset(), 'tiny')
    validate_dataset(make_synthetic(), 'synthetic')


def _broken(change):
    data = copy.deepcopy(tiny_dataset())
    change(data)
    return data


@pytest.mark.parametrize('change, problem', [
    (lambda d: d.pop('val'), "missing key(s) 'val'"),
    (lambda d: d.pop('smap'), "missing key(s) 'smap'"),
    (lambda d: d['val'].__setitem__(1, [1, 2]), 'val[1] must be a list of exactly one int'),
    (lambda d: d['test'].__setitem__(0, []), 'test[0] must be a list of exactly one int'),
    (lambda d: d['test'].__setitem__(0, 3), 'test[0] must be a list of exactly one int'),
    (lambda d: d['train'][0].append(6), 'train[0] holds item id 6, outside 1..5'),
    (lambda d: d['train'][1].insert(0, 0), 'train[1] holds item id 0, outside 1..5'),
    (lambda d: d['val'].__setitem__(2, [9]), 'val[2] holds item id 9, outside 1..5'),
    (lambda d: d['train'].__setitem__(2, []), 'train[2] must be a non-empty list'),
    (lambda d: d['train'][0].append(2.0), 'train[0] holds 2.0 (float)'),
    (lambda d: d['test'].pop(2), "user 2 is in 'train' but not in 'test'"),
    (lambda d: d['val'].__setitem__(7, [1]), "user 7 is in 'val' but not in 'train'"),
    (lambda d: d['train'].__setitem__(3, d['train'].pop(2)),
     "user ids of 'train' must be the ints 0..2, found 3"),
    (lambda d: d.__setitem__('umap', [1, 2]), "'umap' must be a dict"),
    # the id maps must be bijections onto 0..n_users-1 and 1..n_items
    (lambda d: d.__setitem__('smap', {i: i - 1 for i in range(1, 6)}),
     "'smap' must map the 5 original items one-to-one onto the ids 1..5"),
    (lambda d: d['smap'].__setitem__(5, 4), "'smap' must map the 5 original items one-to-one"),
    (lambda d: d['umap'].__setitem__(12, 0), "'umap' must map the 3 original users one-to-one onto the ids 0..2"),
    (lambda d: d['umap'].__setitem__(13, 3), "'umap' must map the 3 original users"),
    (lambda d: d['umap'].__setitem__(12, '2'), "'umap' must map the 3 original users"),
])
def test_validate_rejects_wrong_structures(change, problem):
    with pytest.raises(DataError) as err:
        validate_dataset(_broken(change), '/data/x/dataset.pkl')
    message = str(err.value)
    assert message.startswith('/data/x/dataset.pkl: ')
    assert problem in message
    assert '\n' not in message


def test_a_missing_real_dataset_that_cannot_be_downloaded_is_one_failure_line(tmp_path, monkeypatch):
    from conftest import ensure_datasets
    monkeypatch.setenv(DATA_URL_ENV, 'http://127.0.0.1:9/mirror/')  # nothing listens on port 9
    with pytest.raises(pytest.fail.Exception) as err:
        ensure_datasets(tmp_path, ['toys'])
    message = str(err.value)
    assert message.startswith(f'{tmp_path}/toys/dataset.pkl is missing and could not be downloaded')
    assert message.endswith('place the file there (see datasets/README.md)') and '\n' not in message
    assert not (tmp_path / 'toys' / 'dataset.pkl').exists()


def test_histories_are_everything_before_the_predicted_item():
    data = tiny_dataset()
    assert histories(data, 'val') == [[1, 2, 3], [4, 5], [2]]
    assert histories(data, 'test') == [[1, 2, 3, 4], [4, 5, 1], [2, 3]]
    assert histories(data, 'all') == [[1, 2, 3, 4, 5], [4, 5, 1, 2], [2, 3, 4]]
    with pytest.raises(ValueError, match="unknown split 'train'"):
        histories(data, 'train')


def test_validate_rejects_non_dict():
    with pytest.raises(DataError, match='expected a dict'):
        validate_dataset([1, 2], 'src')


# ---------------------------------------------------------------------------
# load_dataset and download
# ---------------------------------------------------------------------------

def test_load_missing_without_download_names_path(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset('toys', data_dir=str(tmp_path), download=False)
    assert str(tmp_path / 'toys' / 'dataset.pkl') in str(err.value)
    assert dataset_url('toys') in str(err.value)


def test_load_unknown_name_without_known_download(tmp_path):
    with pytest.raises(DataError, match='no download is known') as err:
        load_dataset('my_data', data_dir=str(tmp_path), download=True)
    assert str(tmp_path / 'my_data' / 'dataset.pkl') in str(err.value)
    with pytest.raises(DataError, match='invalid dataset name'):
        load_dataset('../etc', data_dir=str(tmp_path))


def test_load_synthetic_needs_no_files(tmp_path):
    data = load_dataset('synthetic', data_dir=str(tmp_path / 'absent'), download=False)
    assert len(data['train']) == 400 and len(data['smap']) == 200


def test_dataset_url(monkeypatch):
    monkeypatch.delenv(DATA_URL_ENV, raising=False)
    assert dataset_url('toys') == ('https://raw.githubusercontent.com/WHUIR/DiffuRec/'
                                         f'{REPO_COMMIT}/datasets/data/toys/dataset.pkl')
    monkeypatch.setenv(DATA_URL_ENV, 'http://127.0.0.1:9/mirror/')
    assert dataset_url('ml-1m') == 'http://127.0.0.1:9/mirror/ml-1m/dataset.pkl'


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def file_server(tmp_path, real_data_dir):
    """A local HTTP server: good/toys/dataset.pkl and bad/toys/dataset.pkl (one byte flipped)."""
    root = tmp_path / 'www'
    good = (real_data_dir / 'toys' / 'dataset.pkl').read_bytes()
    for sub, raw in (('good', good), ('bad', good[:-10] + bytes([good[-10] ^ 1]) + good[-9:])):
        (root / sub / 'toys').mkdir(parents=True)
        (root / sub / 'toys' / 'dataset.pkl').write_bytes(raw)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_good_file_lands_verified(tmp_path, file_server, monkeypatch):
    monkeypatch.setenv(DATA_URL_ENV, file_server + '/good')
    data_dir = tmp_path / 'data'
    data = load_dataset('toys', data_dir=str(data_dir), download=True)
    dest = data_dir / 'toys' / 'dataset.pkl'
    assert git_blob_id(dest.read_bytes()) == DATASETS['toys']['blob']
    assert os.listdir(dest.parent) == ['dataset.pkl']  # no temp file left
    assert len(data['train']) == COUNTS['toys'][0]


def test_download_corrupt_file_leaves_nothing(tmp_path, file_server):
    dest = tmp_path / 'data' / 'toys' / 'dataset.pkl'
    url = file_server + '/bad/toys/dataset.pkl'
    with pytest.raises(DataError, match='git blob id') as err:
        download_dataset('toys', str(dest), url=url)
    assert url in str(err.value) and str(dest) in str(err.value)
    assert os.listdir(dest.parent) == []


def test_download_http_error_leaves_nothing(tmp_path, file_server):
    dest = tmp_path / 'toys' / 'dataset.pkl'
    with pytest.raises(DataError, match='could not download'):
        download_dataset('toys', str(dest), url=file_server + '/missing/dataset.pkl')
    assert os.listdir(dest.parent) == []


def test_download_unreachable_says_where_to_put_file(tmp_path):
    # A port that was just free and is now closed: connection refused.
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    url = f'http://127.0.0.1:{port}/toys/dataset.pkl'
    dest = tmp_path / 'toys' / 'dataset.pkl'
    with pytest.raises(DataError) as err:
        download_dataset('toys', str(dest), url=url, timeout=5)
    message = str(err.value)
    assert f'place it at {dest}' in message and url in message and '\n' not in message
    assert os.listdir(dest.parent) == []


def test_download_unknown_name(tmp_path):
    with pytest.raises(DataError, match='no download is known'):
        download_dataset('nope', str(tmp_path / 'nope' / 'dataset.pkl'))


# ---------------------------------------------------------------------------
# Synthetic dataset
# ---------------------------------------------------------------------------

def test_make_synthetic_deterministic_and_valid():
    a, b = make_synthetic(), make_synthetic()
    assert a == b
    assert make_synthetic(seed=1) != a
    validate_dataset(a, 'synthetic')
    assert len(a['train']) == 400 and len(a['smap']) == 200
    lengths = [len(s) for s in a['train'].values()]
    assert min(lengths) >= 5 and max(lengths) <= 20
    small = make_synthetic(n_users=10, n_items=30, seed=3)
    validate_dataset(small, 'small')
    assert len(small['train']) == 10 and len(small['smap']) == 30


def test_make_synthetic_is_learnable():
    # The most common successor of each item explains ~90% of transitions, so
    # a model that learns it is far above chance (10 / n_items = 5% HR@10).
    data = make_synthetic()
    pairs = Counter()
    for u in data['train']:
        seq = data['train'][u] + data['val'][u] + data['test'][u]
        pairs.update(zip(seq, seq[1:]))
    best = Counter()
    for (prev, nxt), c in pairs.items():
        best[prev] = max(best[prev], c)
    assert sum(best.values()) / sum(pairs.values()) > 0.85
    successor = {}
    for (prev, nxt), c in pairs.items():
        if c > pairs.get((prev, successor.get(prev)), 0):
            successor[prev] = nxt
    follows = [successor.get(data['val'][u][0]) == data['test'][u][0] for u in data['train']]
    assert np.mean(follows) > 0.8
