"""The framework figure: asset/framework.py draws a PNG of the intended size, and the committed one is there."""
import importlib.util
import struct
from pathlib import Path

import matplotlib.image
import pytest

ASSET_DIR = Path(__file__).resolve().parents[1] / 'asset'
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def load_framework():
    """asset/ is not a package: load the script as a module by its path."""
    spec = importlib.util.spec_from_file_location('framework', ASSET_DIR / 'framework.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_size(path):
    """(width, height) from the IHDR chunk, which a valid PNG has right after its signature."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f'{path} is not a PNG'
    length, kind = struct.unpack('>I4s', data[8:16])
    assert kind == b'IHDR' and length == 13
    return struct.unpack('>II', data[16:24])


@pytest.fixture(scope='module')
def drawn(tmp_path_factory):
    """One drawing shared by the tests (a draw takes a second or two): (module, path of the PNG)."""
    framework = load_framework()
    path = tmp_path_factory.mktemp('figure') / 'sub' / 'figure.png'
    assert framework.draw(path) == path  # the missing folder is created
    return framework, path


def test_draw_writes_png_of_readme_size(drawn):
    _, out = drawn
    width, height = png_size(out)
    assert 1300 <= width <= 1500 and 900 <= height <= 1100, (width, height)
    assert out.stat().st_size < 250_000
    pixels = matplotlib.image.imread(out)
    assert pixels.shape[:2] == (height, width)
    assert pixels[..., :3].min() < 0.3 and pixels[..., :3].max() == 1.0  # dark text on a white ground


def test_cli_out_draws_the_same_bytes(drawn, tmp_path):
    framework, first = drawn
    framework.main(['--out', str(tmp_path / 'again.png')])
    assert (tmp_path / 'again.png').read_bytes() == first.read_bytes()


def test_cli_refuses_a_shortened_flag(drawn, tmp_path, capsys):
    framework, _ = drawn
    with pytest.raises(SystemExit) as stop:
        framework.main(['--ou', str(tmp_path / 'short.png')])
    assert stop.value.code == 2 and 'unrecognized arguments: --ou' in capsys.readouterr().err
    assert not (tmp_path / 'short.png').exists()


def test_committed_figure_is_a_png_of_the_drawn_size(drawn):
    committed = ASSET_DIR / 'diffurec_framework.png'
    assert committed.is_file()
    assert png_size(committed) == png_size(drawn[1])
