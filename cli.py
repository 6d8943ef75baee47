"""What every command line here shares: argument types that check their value before anything
loads (argparse then prints what is wrong and exits 2), the one place that turns a known fault
(a missing file, a bad checkpoint, bad input, a disk or file system that fails) into a
one-line message and exit 1, and the signals a long run stops on. An unexpected error still
shows its traceback: it is a bug to report."""

import argparse
import contextlib
import errno
import fcntl
import math
import os
import signal
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

MAX_SEED = 2 ** 32 - 1  # jax.random.PRNGKey takes a 32-bit seed


class UserError(ValueError):
    """A fault the user can fix; the message says what it is and what to do."""


class Stopped(Exception):
    """A run stopped on a signal after saving; the message says where (exit status 1)."""


# Faults met in the files a user points at; anything else is a bug and keeps its traceback.
KNOWN_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _number(cast, check, what):
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = what  # argparse names the type in its message
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
seed = _number(int, lambda v: 0 <= v <= MAX_SEED, f"a seed in [0, {MAX_SEED}]")
finite_float = _number(float, math.isfinite, "a finite number")
unit_float = _number(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def per_stage(element):
    """An argparse type for "5" or "5,8,8" (one value, or one per stage): a list of values,
    each checked by `element` (one of the types above, or a tuple of choices)."""
    def parse(text):
        parts = text.split(",")
        if isinstance(element, tuple):
            bad = [p for p in parts if p not in element]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad[0]!r} is not one of {', '.join(element)}")
            return parts
        return [element(p) for p in parts]
    parse.__name__ = "per-stage list"
    return parse


def run(main, argv=None):
    """main(argv) with known faults as one line on stderr and exit 1, an interrupt as exit 130."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except KNOWN_ERRORS as e:
        sys.exit(f"error: {e}")
    except Stopped as e:
        sys.exit(str(e))
    except OSError as e:  # the system's, not the program's: a read-only or failing disk, no access
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            sys.exit(f"error: {e.strerror} writing {e.filename or 'a file'}: free space and run the same command "
                     "again (what was saved before is kept; a run resumes from it)")
        where = f" ({e.filename})" if e.filename else ""
        fix = "give a path you may write to" if e.errno == errno.EROFS else "check the disk"
        sys.exit(f"error: {e.strerror or e}{where}: {fix} and run the same command again (what was saved "
                 "before is kept)")
    except KeyboardInterrupt:
        sys.exit("interrupted")


class StopSignals:
    """While active, SIGINT, SIGTERM (kill; Slurm's and Kubernetes' pre-emption) and SIGHUP ask
    the loop to stop instead of raising wherever the program is: the loop looks between steps,
    so the state and the data position it saves belong together. A second signal interrupts at
    once."""

    def __enter__(self):
        self.requested, self._old = None, {}
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def agreed(self, at_log_step: bool) -> bool:
        """Whether to stop after this step: at once on one host; with several, at the next log
        step and on all of them (a signal may reach only one; asking costs a synchronisation)."""
        mine = self.requested is not None
        if jax.process_count() == 1 or not at_log_step:
            return mine and jax.process_count() == 1
        return bool(multihost_utils.process_allgather(np.array(mine)).any())

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def check_folder(path, flag):
    """Refuse a folder argument (--workdir, --text-cache) that names a file, or lies under one,
    before anything loads: makedirs would fail later, after minutes of set-up."""
    if path is None:
        return
    up = os.path.abspath(path)
    while not os.path.exists(up) and os.path.dirname(up) != up:  # the part that exists already
        up = os.path.dirname(up)
    if not os.path.isdir(up):
        raise UserError(f"{flag} {path}{'' if up == os.path.abspath(path) else ': ' + up} is a file: give a folder")


@contextlib.contextmanager
def workdir_lock(workdir):
    """Hold WORKDIR/.lock exclusively (fcntl.flock) for the run: a second run on the same workdir
    is refused, naming the holder, instead of both deleting each other's checkpoints. The kernel
    releases the lock on any exit, a kill included. Several hosts: process 0 alone writes, so it
    alone locks."""
    if jax.process_index() != 0:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    f = open(os.path.join(workdir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not said which"
        f.close()
        raise UserError(f"{workdir} is in use by another run ({holder}): wait for it to end, stop it, "
                        "or give another --workdir") from None
    with f:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}: {' '.join(sys.argv)}\n")
        f.flush()
        yield


def use_every_core():
    """One XLA CPU device per core (a power of two, at most 8), so that each training batch and
    each sampling batch splits data-parallel over the cores: one device keeps 2 cores about 60%
    busy, two run the demo's base step at 1.27x and its super-resolution steps at 1.48x the
    images/s (docs/demo_experiments.md#two-cpu-devices). Before JAX starts its backend; a device
    count already in XLA_FLAGS is kept; accelerators are not affected."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        n = 1 << (min(cores, 8).bit_length() - 1)
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
