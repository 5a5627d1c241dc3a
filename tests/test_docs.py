"""The documentation: README's links resolve, docs/flags.md lists every flag, no machine's paths (nor in the
committed evidence), README's size and its layout table."""
import re
from pathlib import Path

import pytest

import config
import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
DOCS = sorted((ROOT / 'docs').glob('*.md'))
PAGES = [README, ROOT / 'datasets' / 'README.md', ROOT / 'results' / 'README.md', *DOCS]
# The committed evidence of measured runs (reproduce.py --export), text files.
EVIDENCE = sorted(p for p in (ROOT / 'results').rglob('*') if p.suffix in ('.json', '.csv', '.txt', '.md'))

# [text](target) and ![alt](target); the target stops at whitespace or the closing parenthesis.
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')
FENCE = re.compile(r'^```.*?^```', re.S | re.M)
# An absolute path of some machine: a Unix home or work folder, or a Windows drive.
ABSOLUTE = re.compile(r'(?<![\w.~-])/(?:work|home|root|Users)/|\b[A-Za-z]:\\')


def links(page):
    """Relative link targets of a markdown page, outside fenced code blocks."""
    text = FENCE.sub('', page.read_text(encoding='utf-8'))
    return [t for t in LINK.findall(text) if not re.match(r'[a-z]+:', t)]


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def anchors(page):
    text = FENCE.sub('', page.read_text(encoding='utf-8'))
    return {slug(h) for h in re.findall(r'^#+ (.+)$', text, re.M)}


def test_docs_exist():
    names = {p.name for p in DOCS}
    assert {'flags.md', 'corrections.md', 'extensions.md', 'long-runs.md', 'recommendations.md',
            'performance.md', 'own-data.md', 'testing.md'} <= names


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert page.is_file()
    broken = []
    for target in links(page):
        path, _, anchor = target.partition('#')
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_file() or ROOT not in dest.parents:
            broken.append(target)
        elif anchor and dest.suffix == '.md' and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f'{page.name}: links that resolve to no file or heading of the repository: {broken}'


def test_readme_links_every_docs_page():
    linked = {(README.parent / t.partition('#')[0]).resolve() for t in links(README)}
    assert not [p.name for p in DOCS if p.resolve() not in linked]


def test_link_parser_sees_images_and_skips_urls_and_code():
    page_text = ('![fig](asset/a.png) [x](docs/b.md#c) [web](https://example.org)\n'
                 '```\n[no](in/code.md)\n```\n')
    text = FENCE.sub('', page_text)
    assert [t for t in LINK.findall(text) if not re.match(r'[a-z]+:', t)] == ['asset/a.png', 'docs/b.md#c']
    assert slug('User groups (`--long_head`)') == 'user-groups---long_head'
    assert slug('The format of `dataset.pkl`') == 'the-format-of-datasetpkl'


def parser_flags():
    return sorted({s for action in config.build_parser()._actions for s in action.option_strings
                   if s.startswith('--') and s != '--help'})


def test_flags_page_lists_every_flag_of_main():
    text = (ROOT / 'docs' / 'flags.md').read_text(encoding='utf-8')
    flags = parser_flags()
    assert '--model' in flags and '--no-rank_padding' in flags
    # A whole flag: `--out` must not be found inside `--out_dir`.
    missing = [f for f in flags if not re.search(r'(?<![\w-])' + re.escape(f) + r'(?![\w-])', text)]
    assert not missing, f'docs/flags.md lacks {missing}'


@pytest.mark.parametrize('text, found', [
    ('cp /home/ann/x.pkl .', True), ('`/work/shared/datasets`', True), ('(/root/a)', True),
    ('/Users/bob/data', True), (r'C:\data\x.csv', True),
    ('datasets/home/x', False), ('/path/to/dataset.pkl', False), ('runs/work/a', False),
])
def test_absolute_path_pattern(text, found):
    assert bool(ABSOLUTE.search(text)) is found


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_absolute_paths_of_a_machine(page):
    hits = [line for line in page.read_text(encoding='utf-8').splitlines() if ABSOLUTE.search(line)]
    assert not hits, f'{page.name}: {hits}'


def test_committed_evidence_names_no_machine_path():
    assert len(EVIDENCE) >= 5  # at least one run's results.json, metrics.csv, config.json, log.txt and an index
    hits = [f'{p.relative_to(ROOT)}: {line.strip()}' for p in EVIDENCE
            for line in p.read_text(encoding='utf-8').splitlines() if ABSOLUTE.search(line)]
    assert not hits, hits[:3]


def test_readme_is_a_front_page():
    assert README.stat().st_size <= 12_500
    text = README.read_text(encoding='utf-8')
    assert '\n```bash\npython -m pytest -q\n```' in text or '\npython -m pytest -q\n' in text
    assert len(re.findall(r'^\| `results\.json` \|', text, re.M)) == 1  # one row of the outputs table


def test_readme_layout_has_a_row_for_every_top_level_module():
    text = README.read_text(encoding='utf-8').split('\n## Layout\n', 1)[1].split('\n## ', 1)[0]
    listed = {name for line in text.splitlines() if line.startswith('| `')
              for name in re.findall(r'`([\w.]+)`', line.split('|')[1])}
    modules = {p.name for p in ROOT.glob('*.py')}
    assert modules - listed == set(), 'modules without a row in README\'s Layout'
    assert {'main.py', 'utils.py', 'cli.py', 'dist_util.py'} <= modules


def test_readme_names_every_key_of_results_json(tmp_path):
    row = next(line for line in README.read_text(encoding='utf-8').splitlines()
               if line.startswith('| `results.json` |'))
    documented = set(re.findall(r'`(\w+)`', row.split('|')[2]))
    results = main.run(config.resolve([
        '--dataset', 'synthetic', '--epochs', '1', '--limit_train_batches', '1', '--limit_eval_batches', '1',
        '--epoch_time_avg', '--long_head', '--test_both_protocols', '--device', 'cpu', '--hidden_size', '8', '--num_blocks', '1', '--heads', '1',
        '--diffusion_steps', '4', '--out_dir', str(tmp_path / 'run'), '--log_file', '']))
    assert documented == set(results)
