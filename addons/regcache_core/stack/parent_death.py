"""Children that end when their parent ends, however it ends (SIGKILL and the OOM killer too):
the kernel's parent-death signal (prctl PR_SET_PDEATHSIG), set in the child between fork and
exec. It survives exec (not of a set-user-ID program: none is started here).

The kernel sends it when the *thread* that forked the child exits, not the process: so a child
is only ever forked from the main thread, which lives as long as the process.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import threading
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Looked up here, in the parent: the child only calls it.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def dies_with_this_process() -> Callable[[], None]:
    """What a child of this process calls first (Popen's preexec_fn, a forked worker's first
    line) to be SIGKILLed when this process ends. (A preexec_fn runs Python between fork and
    exec, which is safe only where no other thread could hold a lock: `regcache up` and the data
    plane's parent run none.)"""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("children are forked from the main thread: the parent-death signal "
                           "would come when the forking thread ends")
    return functools.partial(die_with_parent, os.getpid())


def die_with_parent(parent: int) -> None:
    """In a child of `parent`: be SIGKILLed when it ends. If it ended before this ran, the child
    already belongs to another process (init or a subreaper) and no signal will come: end now."""
    if _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)
