"""The command-line pieces every entry point shares: a parser whose errors are one line, value types, and
the path checks made before any work.

Nothing happens at import time.
"""
import argparse
import math
import os
import re
import tempfile


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
