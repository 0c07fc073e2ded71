"""Weight publishing over ZeroMQ: learner rank 0 → every actor (DESIGN.md §3.2).

``WeightPublisher(cfg).publish(version, named_tensors)`` and
``WeightSubscriber(address, on_weights, cfg).start()``; the format is in ``wire.py``.
Subscribers on the publisher's host map its /dev/shm send buffer instead (``shm.py``).
"""

from async_rl.weights.publisher import WeightPublisher
from async_rl.weights.subscriber import WeightSubscriber

__all__ = ["WeightPublisher", "WeightSubscriber"]
