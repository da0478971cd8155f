"""Hold back preemption signals while a checkpoint is written.

SLURM announces preemption and the time limit with a signal (``USR2`` by default, ``TERM`` when
cancelling); submitit's handler then requeues the job and exits the process at once. Arriving
during ``torch.save``, that exit would abandon the checkpoint being written (the temporary file
is removed, so nothing corrupt remains, but that epoch's work is redone). Inside
:func:`deferred`, such signals are recorded and handed to their handlers when the block ends.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGUSR1", "SIGUSR2", "SIGTERM") if hasattr(signal, name)
)


@contextlib.contextmanager
def deferred(signals: tuple[int, ...] = PREEMPTION_SIGNALS) -> Iterator[None]:
    """Run the block with ``signals`` held back; deliver them, in order, once it ends.

    Only the main thread can install handlers; elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, FrameType | None]] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        log.warning("%s during a checkpoint write: handled once it is written", name)
        pending.append((signum, frame))

    previous = {signum: signal.signal(signum, hold) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum, frame in pending:
            _deliver(signum, frame, previous[signum])


def _deliver(signum: int, frame: FrameType | None, handler) -> None:
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)  # the default action (for TERM: end the process)
