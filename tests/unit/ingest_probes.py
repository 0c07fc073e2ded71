"""A probe for the pipelined insert path: does the next batch get prepared while one is written?"""

import os
import threading

GATE_TIMEOUT_S = 10.0  # a write that never sees the next batch prepared fails instead of hanging


class WriteOverlap:
    """Patches ``module.prepare_batch`` and ``os.write``. Every batch written to a segment (past
    its schema) waits until the batch after it (of ``total``) has been prepared, and records
    ``(writing thread, whether that happened)`` in ``writes``; ``prepared`` lists the batches
    prepared, in order. Prepared on the writing thread, the next batch never comes in time."""

    def __init__(self, monkeypatch, module, total: int) -> None:
        self.prepared, self.writes = [], []
        changed = threading.Condition()
        real_prepare, real_write = module.prepare_batch, os.write

        def prepare(data, encoded=None):
            result = real_prepare(data, encoded)
            with changed:
                self.prepared.append(data)
                changed.notify_all()
            return result

        def write(fd, data):
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".arrows") and os.fstat(fd).st_size:
                wanted = min(len(self.writes) + 2, total)
                with changed:
                    overlapped = changed.wait_for(lambda: len(self.prepared) >= wanted, GATE_TIMEOUT_S)
                self.writes.append((threading.current_thread().name, overlapped))
            return real_write(fd, data)

        monkeypatch.setattr(module, "prepare_batch", prepare)
        monkeypatch.setattr(os, "write", write)
