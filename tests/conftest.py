"""Shared pytest fixtures."""

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The project's modules live at the repository root; make them importable
# however pytest is invoked.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from data import DEFAULT_DATA_DIR, DataError, download_dataset  # noqa: E402

# The real datasets the suite checks (the paper's three).
REAL_DATASETS = ('amazon_beauty', 'toys', 'ml-1m')


def ensure_datasets(folder, names=REAL_DATASETS):
    """folder/<name>/dataset.pkl for every name, a missing one downloaded with the project's verified
    downloader; when that fails too, one failure line says which file and how to place it (a failure, not a
    skip: these are the checks of the real data). Returns folder as a Path."""
    folder = Path(folder)
    for name in names:
        path = folder / name / 'dataset.pkl'
        if not path.is_file():
            try:
                download_dataset(name, str(path))
            except DataError as e:
                pytest.fail(f'{path} is missing and could not be downloaded ({e}); '
                            f'place the file there (see datasets/README.md)', pytrace=False)
    return folder


@pytest.fixture(scope='session')
def real_data_dir():
    """The project's own data folder (datasets/data, the default --data_dir) with the real datasets."""
    return ensure_datasets(DEFAULT_DATA_DIR)


class FakeClock:
    """Time that passes only with the work: 10 units per training batch and per evaluation batch, nothing
    for anything else (a checkpoint write takes 0, stopping.SAVE_GUESS = 5 units until one was timed)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    """A FakeClock that DiffuRec's training and scoring batches advance: pass it to main.main(argv, clock=...)."""
    from model import DiffuRec
    fake = FakeClock()
    forward, scores = DiffuRec.forward, DiffuRec.scores

    def timed_forward(self, *args, **kwargs):
        fake.now += 10
        return forward(self, *args, **kwargs)

    def timed_scores(self, *args, **kwargs):
        fake.now += 10
        return scores(self, *args, **kwargs)

    monkeypatch.setattr(DiffuRec, 'forward', timed_forward)
    monkeypatch.setattr(DiffuRec, 'scores', timed_scores)
    return fake
