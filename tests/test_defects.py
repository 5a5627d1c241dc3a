"""Defects of issue 11: explicit flags against --strict, --resume's comparison, --seeds under torchrun, log-copy
names, --recommend's sampling flags and scores() on input that is not left-padded."""
import json

import pytest

import main

# A run of a few seconds, should a refused command start one after all.
QUICK = ['--dataset', 'synthetic', '--hidden_size', '16', '--num_blocks', '1', '--log_file', '', '--epochs', '1',
         '--limit_train_batches', '1', '--limit_eval_batches', '1']


@pytest.mark.parametrize('flags, message', [
    (['--attention_mask', 'causal'], '--strict sets --attention_mask key; drop --strict or --attention_mask causal'),
    (['--select_metric', 'HR@10'], '--strict sets --select_metric NDCG@10; drop --strict or --select_metric HR@10'),
    (['--metric_average', 'batch'], '--strict sets --metric_average user; drop --strict or --metric_average batch'),
    (['--rank_padding'], '--strict sets --no-rank_padding; drop --strict or --rank_padding'),
])
def test_strict_refuses_an_explicit_flag_that_contradicts_it(tmp_path, capsys, flags, message):
    assert main.main(QUICK + ['--strict', '--out_dir', str(tmp_path / 'run')] + flags) == 2
    err = capsys.readouterr().err
    assert err == f'error: {message}\n'


def test_strict_accepts_explicit_flags_equal_to_its_settings():
    cfg = main.parse_config(['--strict', '--attention_mask', 'key', '--select_metric', 'NDCG@10',
                             '--no-rank_padding', '--exclude_history', '--metric_average', 'user'])
    assert (cfg.attention_mask, cfg.select_metric, cfg.rank_padding, cfg.metric_average) == \
        ('key', 'NDCG@10', False, 'user')


def test_strict_with_sasrec_still_names_a_diffusion_flag():
    with pytest.raises(ValueError, match='does not apply to --model sasrec'):
        main.parse_config(['--model', 'sasrec', '--strict', '--attention_mask', 'causal'])


def test_resume_compares_normalised_flags(tmp_path):
    """--optimizer adam is Adam, and --metric_ks in another order (or repeated) are the same cut-offs."""
    run_dir = str(tmp_path / 'run')
    assert main.main(QUICK + ['--epochs', '2', '--eval_interval', '1', '--optimizer', 'adam', '--metric_ks', '10', '5',
                              '10', '--out_dir', run_dir]) == 0
    with open(f'{run_dir}/config.json') as f:
        stored = json.load(f)
    assert (stored['optimizer'], stored['metric_ks']) == ('Adam', [5, 10])  # stored canonical
    for flags in (['--optimizer', 'Adam'], ['--optimizer', 'adam'], ['--metric_ks', '5', '10'],
                  ['--metric_ks', '10', '5', '5']):
        cfg = main.parse_config(['--resume', run_dir] + flags)
        assert (cfg.optimizer, cfg.metric_ks) == ('Adam', [5, 10])
    with pytest.raises(ValueError, match="optimizer='Adam' .given 'SGD'"):
        main.parse_config(['--resume', run_dir, '--optimizer', 'sgd'])
