"""Parity with the reference implementation's own outputs on a tiny model (tests/golden/forward_tiny.json)."""
import contextlib
import json
import os

import pytest
import torch
import torch.nn.functional as F

from diffurec import timestep_embedding
from model import DiffuRec

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden', 'forward_tiny.json')


def golden_model(golden):
    cfg = golden['config']
    model = DiffuRec(cfg['n_items'], hidden_size=cfg['hidden_size'], num_blocks=cfg['num_blocks'],
                     heads=cfg['heads'], diffusion_steps=cfg['diffusion_steps'],
                     noise_schedule=cfg['noise_schedule'], rescale_timesteps=cfg['rescale_timesteps'])
    w = {k: torch.tensor(v, dtype=torch.float32) for k, v in golden['weights'].items()}
    ours = {'item_table.weight': w['item_table']}
    for name in ('embed_ln', 'out_ln', 'time_mlp.0', 'time_mlp.2'):
        prefix = '' if name == 'embed_ln' else 'approximator.'
        for p in ('weight', 'bias'):
            ours[f'{prefix}{name}.{p}'] = w[f'{name}.{p}']
    for i in range(cfg['num_blocks']):
        for theirs, mine in [('ln_attn', 'ln_attn'), ('ln_ffn', 'ln_ffn'), ('attn.q', 'attn.q'),
                             ('attn.k', 'attn.k'), ('attn.v', 'attn.v'), ('attn.out', 'attn.out'),
                             ('ffn.w1', 'w1'), ('ffn.w2', 'w2')]:
            for p in ('weight', 'bias'):
                ours[f'approximator.blocks.{i}.{mine}.{p}'] = w[f'blocks.{i}.{theirs}.{p}']
    model.load_state_dict(ours, strict=True)
    assert sum(v.numel() for v in ours.values()) == sum(p.numel() for p in model.parameters()) == 2416
    return model.eval()


@pytest.fixture(scope='module')
def golden():
    with open(GOLDEN) as f:
        return json.load(f)


def t32(x):
    return torch.tensor(x, dtype=torch.float32)


# Inference runs the fused CPU products of diffurec.linear (bias, activation and residual inside oneDNN's
# product); with autograd recording, the plain layers. Both must give the reference's numbers.
MODES = pytest.mark.parametrize('inference', [False, True], ids=['autograd', 'inference'])


def mode(inference):
    if not inference:
        return contextlib.nullcontext()
    return torch.inference_mode()  # the fused products, or the plain layers where the kernel does not work


@MODES
def test_forward_matches_reference(golden, inference):
    with mode(inference):
        check_forward(golden_model(golden), golden)


def check_forward(model, golden):
    inp, out = golden['inputs'], golden['outputs']
    seq, labels = torch.tensor(inp['seq']), torch.tensor(inp['labels'])
    t = torch.tensor(inp['t'])
    h, mask = model.embed(seq)
    torch.testing.assert_close(h, t32(out['h']), atol=1e-4, rtol=0)
    approx = model.approximator
    z = t32(inp['x_t']) + approx.time_mlp(timestep_embedding(model.diffusion.scale_timesteps(t), 8))
    u = h + t32(inp['lambda']) * z[:, None, :]
    torch.testing.assert_close(approx.transformer(u, mask), t32(out['transformer_out']), atol=1e-4, rtol=0)
    x0_hat = approx(h, t32(inp['x_t']), model.diffusion.scale_timesteps(t), mask, lam=t32(inp['lambda']))
    torch.testing.assert_close(x0_hat, t32(out['x0_hat']), atol=1e-4, rtol=0)
    logits = model.logits(x0_hat)
    torch.testing.assert_close(logits, t32(out['logits']), atol=1e-4, rtol=0)
    assert abs(F.cross_entropy(logits, labels).item() - out['loss']) < 1e-4


@MODES
def test_reverse_process_matches_reference(golden, inference):
    model = golden_model(golden)
    inp, out = golden['inputs'], golden['outputs']
    with mode(inference):
        h, mask = model.embed(torch.tensor(inp['seq']))
        x0 = model.diffusion.p_sample_loop(model.approximator, h, mask, x_T=t32(inp['x_T']),
                                           step_noise=[t32(n) for n in inp['step_noise']], lam=t32(inp['lambda']))
    torch.testing.assert_close(x0, t32(out['reverse_x0']), atol=1e-4, rtol=0)
