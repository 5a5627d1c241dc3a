"""Shared pytest fixtures."""

import os
import sys
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
