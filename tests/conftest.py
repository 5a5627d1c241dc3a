"""Shared pytest fixtures."""

import os
import sys
from functools import partial
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The project's modules live at the repository root; make them importable
# however pytest is invoked.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope='session')
def shared_data_dir():
    """Directory with the real datasets as <name>/dataset.pkl.

    $DIFFUREC_SHARED_DATA, default <repo>/../shared/datasets. Its absence is a
    failure, not a skip: these are the checks of the real data.
    """
    path = Path(os.environ.get('DIFFUREC_SHARED_DATA', REPO_ROOT.parent / 'shared' / 'datasets'))
    if not path.is_dir():
        pytest.fail(f'no shared datasets at {path} (set DIFFUREC_SHARED_DATA)')
    return path


class FakeClock:
    """Time that passes only with the work: 10 units per training batch and per evaluation batch, nothing
    for anything else (a checkpoint write takes 0, trainer.SAVE_GUESS = 5 units until one was timed)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    """main.run's TimeBudget on a FakeClock that DiffuRec's training and scoring batches advance."""
    import main
    import trainer
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
    monkeypatch.setattr(main, 'TimeBudget', partial(trainer.TimeBudget, clock=fake))
    return fake
