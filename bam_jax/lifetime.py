"""Child processes that end with their parent, whatever killed it; Ctrl-C for the parent.

A run killed with `kill -9` cannot stop its grain workers or its torch child, and
Linux reparents them to init, where each kept ~240 MB and its shared-memory batches
alive. So every child the tool starts watches its parent: a thread in the child polls
its parent's pid and ends the child when the parent is gone (`PR_SET_PDEATHSIG` would
fire when the *thread* that started the child ends, which for grain's workers is not
the run's end). Children also ignore SIGINT: a Ctrl-C reaches the whole process group,
and the parent, which stops them itself, is the one that reports it.

A child can be started at any moment (grain starts its workers from its own threads,
again after every ContrastiveCrop update), and one that a Ctrl-C reaches before its
first line ran dies of it, which the run then reports as a crashed worker.
`route_interrupts` closes that window: the command blocks SIGINT in every thread it
will have, so children start with it blocked (until `end_with_parent` ignores it), and
one thread takes each SIGINT and raises it in the main thread, where the command's
handler (a checkpoint and exit, or KeyboardInterrupt) runs as before.

No JAX here: grain's worker processes import this module.
"""

from __future__ import annotations

import _thread
import os
import signal
import threading
import time

POLL_SECONDS = 0.5


def _exit_when_orphaned(parent: int):
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    os._exit(1)  # pylint: disable=protected-access


def end_with_parent():
    """Ends this process within `POLL_SECONDS` of its parent's death; Ctrl-C ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a pending one is dropped
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True,
                     name='end_with_parent').start()


def grain_worker_init(worker_index: int, worker_count: int):
    """`worker_init_fn` of grain's `mp_prefetch`."""
    del worker_index, worker_count
    end_with_parent()


def _relay_interrupts():
    while True:
        signal.sigwait({signal.SIGINT})
        _thread.interrupt_main(signal.SIGINT)  # runs the main thread's SIGINT handler


def route_interrupts():
    """SIGINT blocked in this thread and all it starts, taken by one relay thread.

    Call it in the main thread before the libraries that start threads or processes
    (JAX, grain) are imported.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    threading.Thread(target=_relay_interrupts, daemon=True, name='interrupts').start()
