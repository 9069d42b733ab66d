"""Test helper: a release timer for ``sidecar.plane.padding`` that records each deadline
(and, with a ``log``, a "release" line) and completes its futures only when told."""

from __future__ import annotations


class RecordingTimer:
    def __init__(self, loop, log: list | None = None):
        self.loop, self.log, self.waits = loop, log, []

    def wait(self, deadline):
        fut = self.loop.create_future()
        self.waits.append((deadline, fut))
        if self.log is not None:
            self.log.append("release")
        return fut

    def fire(self):
        for _, fut in self.waits:
            if not fut.done():
                fut.set_result(None)

    def close(self):
        pass
