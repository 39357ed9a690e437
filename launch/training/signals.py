"""A graceful stop: SIGTERM (a cluster's pre-emption) or a first Ctrl-C sets a flag; the loop checkpoints at the
end of the current step and exits 0. A second Ctrl-C stops at once."""
from __future__ import annotations

import contextlib
import signal
from typing import Any


class StopFlag:
    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signal).name if self.signal is not None else None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
