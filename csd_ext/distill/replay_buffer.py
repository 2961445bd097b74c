"""A FIFO replay buffer of student-generated training examples (ImitKD / DistiLLM style).

Each entry is an encoded example as the data pipeline makes them
(``input_ids``, ``labels``, ``prompt_ids``: lists of ints).  When full, the
oldest entries leave first.  Batches are drawn uniformly without replacement
with a caller-owned ``random.Random``, so a run that restores the buffer and
that generator continues exactly where it stopped.
"""

import collections
import random


class ReplayBuffer:
    KEYS = ("input_ids", "labels", "prompt_ids")

    def __init__(self, capacity):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"replay buffer capacity must be an integer > 0, got {capacity!r}")
        self.capacity = capacity
        self._items = collections.deque(maxlen=capacity)  # deque(maxlen) drops from the left: FIFO

    def __len__(self):
        return len(self._items)

    def push(self, items):
        """Append examples; beyond ``capacity`` the oldest ones are evicted."""
        for it in items:
            missing = [k for k in self.KEYS if k not in it]
            if missing:
                raise ValueError(f"replay buffer entries need {', '.join(self.KEYS)}; missing {', '.join(missing)}")
            self._items.append({k: list(it[k]) for k in self.KEYS})

    def sample(self, n, rng):
        """``min(n, len(self))`` distinct entries, uniformly at random (``rng``: a ``random.Random``)."""
        if not self._items:
            raise ValueError("cannot sample from an empty replay buffer")
        if n <= 0:
            raise ValueError(f"sample size must be > 0, got {n}")
        picks = rng.sample(range(len(self._items)), min(n, len(self._items)))
        return [self._items[i] for i in picks]

    def items(self):
        """The entries, oldest first (a copy of the list, not of the entries)."""
        return list(self._items)

    def state_dict(self):
        """JSON-serialisable contents (plain lists of ints)."""
        return {"capacity": self.capacity, "items": [dict(it) for it in self._items]}

    def load_state_dict(self, state):
        if state["capacity"] != self.capacity:
            raise ValueError(f"replay buffer capacity changed: the checkpoint's is {state['capacity']}, "
                             f"this run's replay_buffer_size is {self.capacity}")
        self._items.clear()
        self.push(state["items"])


def rng_state(rng):
    """``random.Random`` state as JSON-friendly lists."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng, state):
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


def make_rng(seed):
    return random.Random(seed)
