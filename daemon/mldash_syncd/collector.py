"""Python's cyclic garbage collector, paused while the daemon starts.

Start-up allocates hundreds of thousands of objects that live as long as the process — botocore's service
model and client, PyMongo's client, the manifests being ingested — so the allocation counters trip the
collector over and over, and once or twice into a full collection that traverses the whole heap and frees
nothing. Measured in the drain benchmark: one full collection of 60–90 ms landed in every start-up, most of
the time before the first upload. Paused until the first uploads are in flight, those collections run later,
while the daemon mostly waits on the network. Refcounting frees everything else meanwhile; the pause lasts
only the start-up (~0.1–0.2 s), and the collector's state is restored even if start-up fails.
"""

from __future__ import annotations

import gc


class CollectorPause:
    def __init__(self) -> None:
        self._paused = False

    def begin(self) -> None:
        if gc.isenabled():  # a host process that disabled it itself keeps it that way
            gc.disable()
            self._paused = True

    def end(self) -> None:
        if self._paused:
            self._paused = False
            gc.enable()

    @property
    def paused(self) -> bool:
        return self._paused
