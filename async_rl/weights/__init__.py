"""Weight publishing over ZeroMQ: learner rank 0 → every actor (DESIGN.md §3.2).

``WeightPublisher(cfg).publish(version, named_tensors)`` and
``WeightSubscriber(address, on_weights, cfg).start()``; the format is in ``wire.py``.
Subscribers on the publisher's host map its /dev/shm send buffer instead (``shm.py``).
The two classes load on first use, so the job's CURVE keys (``keys.py``, also used by the
buffer and the control endpoint) import without torch.
"""

__all__ = ["WeightPublisher", "WeightSubscriber"]


def __getattr__(name: str):
    if name == "WeightPublisher":
        from async_rl.weights.publisher import WeightPublisher

        return WeightPublisher
    if name == "WeightSubscriber":
        from async_rl.weights.subscriber import WeightSubscriber

        return WeightSubscriber
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
