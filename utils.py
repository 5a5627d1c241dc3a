"""Small run-time helpers: seeds and RNG state, the allocator, devices, config dicts, the run log, and the
one atomic file write every writer of the project uses.

Nothing happens at import time.
"""
import os
import random
import re
import tempfile

import numpy as np
import torch
from tqdm import tqdm


def write_atomic(path, write, binary=False):
    """Write a file that is always whole: write(f) fills a temporary file in the same folder, which is
    flushed, fsynced and renamed over `path`. On any error the temporary file is removed and `path` is
    left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, 'wb' if binary else 'w', **({} if binary else {'newline': '', 'encoding': 'utf-8'})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json(obj, path):
    """obj as indented JSON at `path`, written atomically."""
    import json
    write_atomic(path, lambda f: json.dump(obj, f, indent=2))


def set_seed(seed):
    """Seed every generator in play: python, numpy, torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def seed_per_process(rank, world):
    """From generators alike on every process, a seed per process: `world` seeds are drawn alike everywhere
    and each process takes the one of its rank, so that each draws its own noise, timesteps and dropout."""
    set_seed(int(torch.randint(2 ** 31 - 1, (world,))[rank]))


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

    By default every block over 32 MiB (a feed-forward activation at the defaults is larger) is mapped anew
    at each allocation and unmapped when freed, so it is paid again in page faults each time
    (docs/performance.md gives the measured cost). The price: the process never shrinks.
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


def check_device(name):
    """The spelling of --device, checked before any work (choose_device then checks that it is there)."""
    if not re.fullmatch(r'auto|cpu|cuda(:\d{1,4})?', name):
        raise ValueError(f'unknown --device {name!r}; use auto, cpu, cuda or cuda:N')


def choose_device(name='auto', local_rank=0):
    """'auto' -> cuda if available else cpu; 'cuda' under torchrun -> this process's GPU."""
    check_device(name)
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
    return torch.device(name)


def cpu_has_native_bf16():
    """Whether oneDNN has native bf16 matrix products on this CPU (AVX-512 BF16 or AMX); None where this torch
    cannot tell."""
    supported = getattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', None)
    return None if supported is None else bool(supported())


def bf16_is_emulated(device):
    """Whether bf16 matrix products on `device` lack native instructions: a CPU without AVX-512 BF16 or AMX,
    where oneDNN converts to float32 on the fly and --precision bf16 runs many times slower than fp32."""
    return device.type == 'cpu' and cpu_has_native_bf16() is False


def hardware(device):
    """The machine in words, for results.json and bench.py's report: the GPU's name, or the CPU's model, its
    logical cores and whether oneDNN has native bf16 there (which decides what --precision bf16 costs)."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    import platform
    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), model)
    except OSError:
        pass
    native = cpu_has_native_bf16()
    bf16 = '' if native is None else ', native bf16' if native else ', bf16 emulated'
    return f'{model}, {os.cpu_count()} cores{bf16}'


def config_dict(cfg):
    """A JSON-able copy of a config namespace (or dict)."""
    items = cfg.items() if isinstance(cfg, dict) else vars(cfg).items()
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in items}


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
