"""SIGTERM / SIGINT: stop cleanly at the next optimizer-step boundary.

Schedulers send SIGTERM some time before SIGKILL; Ctrl-C sends SIGINT. The first signal only
sets a flag: the loop finishes the optimizer step it is in, writes a final checkpoint (atomically,
as always), prints where it is and how to resume, and exits 143 (SIGTERM) or 130 (SIGINT). A
second signal exits at once: every write is atomic, so that loses at most the step in flight.
Under torchrun every rank receives the signal from its agent; the ranks agree on the stop step
through one small all-reduce per optimizer step on a CPU (gloo) group, which never waits on the
accelerator.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional

from . import distributed

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


class StopRequest:
    def __init__(self):
        self.signal: Optional[int] = None
        self._previous: dict = {}

    def install(self) -> None:
        for signum in EXIT_CODES:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            print(
                f"{name} again: exiting now (the newest complete checkpoint is intact)",
                file=sys.stderr,
                flush=True,
            )
            os._exit(EXIT_CODES[signum])
        self.signal = signum
        print(
            f"{name}: finishing this optimizer step, then saving a checkpoint "
            "(send it again to exit at once)",
            file=sys.stderr,
            flush=True,
        )

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal, 1)

    def agreed(self, context) -> bool:
        """Whether any rank has been asked to stop (every rank calls this at every step end)."""
        if not context.distributed:
            return self.signal is not None
        signum = distributed.max_over_ranks(self.signal or 0, context)
        if signum and self.signal is None:
            self.signal = signum
        return bool(signum)
