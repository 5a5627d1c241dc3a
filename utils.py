"""Small run-time helpers: seeds and RNG state, the allocator, devices and torchrun processes, config
dicts, the run log, the one atomic file write every writer of the project uses, and the command-line
pieces every entry point shares (a parser whose errors are one line, value types, path checks at start).

Nothing happens at import time.
"""
import argparse
import math
import os
import random
import re
import sys
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
                         'torchrun (see docs/long-runs.md), or unset WORLD_SIZE') from None


def init_distributed(device, rank, world):
    """Join the process group that torchrun announced: NCCL between GPUs, gloo between CPU processes."""
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', rank=rank, world_size=world)


def end_distributed(together=False):
    """Leave the process group, if this process is in one. together: every process ends here at the same point
    (a finished run, or a stop they agreed on), so they first wait for each other; a process that leaves while
    another still writes its files was seen to abort in the group's teardown."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def exit_process(code):
    """End the program with exit status `code`. One of several torchrun processes leaves without the
    interpreter's teardown: a gloo worker thread may still be freeing a finished collective's tensors, which
    takes the GIL, and if the interpreter is shutting down by then the process aborts (docs/long-runs.md).
    Every file is written and closed by then; stdout and stderr are flushed here."""
    if os.environ.get('WORLD_SIZE', '1') not in ('', '1'):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


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


# ----------------------------------------------------------------------------------------------------------
# Command lines: every entry point's parser, value types and the path checks made before any work
# ----------------------------------------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise ValueError (the entry point prints one `error:` line and exits
    2) instead of printing the usage and exiting: the message names the flag, the help names the values.
    A shortened flag is refused rather than expanded: `--seed 5` would otherwise silently be `--seeds 5`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('allow_abbrev', False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise ValueError(f'{message} (python {self.prog} --help lists every flag)')


def int_in(low, high, what):
    """An argparse type: an integer in [low, high); `what` says which in the error."""
    def convert(text):
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value < high:
            raise argparse.ArgumentTypeError(f'must be {what}, got {text!r}')
        return value
    return convert


# Counts and sizes stop below 2**31: larger ones overflow torch's sizes long before they make sense.
positive_int = int_in(1, 2 ** 31, 'a positive integer below 2**31')
non_negative_int = int_in(0, 2 ** 31, 'an integer >= 0 and below 2**31')
seed = int_in(0, 2 ** 32, 'an integer in [0, 2**32 - 1]')  # numpy's seeds


def finite_float(text):
    """A number; nan and inf are refused here, so that no range check downstream has to think of them."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f'must be a finite number, got {text!r}')
    return value


def duration(text):
    """--time_limit: seconds, or a number with suffix s, m or h ('90', '90s', '9m', '1.5h') -> seconds."""
    match = re.fullmatch(r'(\d+\.?\d*|\.\d+)([smh]?)', text.strip())
    seconds = float(match[1]) * {'': 1, 's': 1, 'm': 60, 'h': 3600}[match[2]] if match else 0.0
    if not (seconds > 0 and math.isfinite(seconds)):
        raise argparse.ArgumentTypeError(f'expected a positive number of seconds, or one with suffix s, m or h '
                                         f'(90, 90s, 9m, 1.5h), got {text!r}')
    return seconds


def check_not_empty(parser, args, empty_means=()):
    """A text flag given as "" is an error (it would silently mean the default or nothing), except the flags
    named in empty_means, for which "" means something."""
    for action in parser._actions:
        if action.type is None and action.nargs in (None, '?') and action.dest not in empty_means \
                and getattr(args, action.dest, None) == '':
            raise ValueError(f'{(action.option_strings or [action.dest])[0]} is empty; give a value or leave '
                             f'the flag out')


def writable_dir(path, flag, create=True):
    """Prove before any work that the folder `path` can be made and written, so that no run loses its work to a
    bad path at its end: its missing folders are made and a probe file is written in it. create=False removes
    again the folders the proof made (a check that leaves nothing behind). ValueError (one line naming `flag`)
    otherwise."""
    if not path:
        raise ValueError(f'{flag} is empty; give a folder')
    made = []
    try:
        missing, folder = [], os.path.abspath(path)
        while not os.path.lexists(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
                made.append(folder)
            except FileExistsError:  # made meanwhile by another process: fine when a folder
                if not os.path.isdir(folder):
                    raise
        fd, probe = tempfile.mkstemp(prefix='.write_test', dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        reason = 'a file is in the way' if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
        raise ValueError(f'{flag} {path}: cannot write a folder there ({reason}); choose another {flag}') from None
    finally:
        if not create:
            for folder in reversed(made):
                try:
                    os.rmdir(folder)
                except OSError:  # something was written into it meanwhile: it stays
                    break
    return path


def writable_file(path, flag, create=True):
    """A file `path` to be written later: not a folder, and its folder writable (writable_dir)."""
    if not path:
        raise ValueError(f'{flag} is empty; give a file path')
    if os.path.isdir(path) or path.endswith(os.sep):
        raise ValueError(f'{flag} {path} is a folder; give a file path')
    writable_dir(os.path.dirname(path) or '.', flag, create)
    return path


def readable_file(path, flag):
    """An input file that is there and can be read; ValueError (one line naming `flag`) otherwise."""
    if not path:
        raise ValueError(f'{flag} is empty; give a file path')
    if os.path.isdir(path):
        raise ValueError(f'{flag} {path} is a folder; give a file')
    try:
        with open(path, 'rb') as f:
            f.read(1)
    except OSError as e:
        raise ValueError(f'{flag} {path}: cannot open it ({e.strerror}); give a readable file') from None
    return path
