"""Console messages and the metrics JSONL log (main process only)."""

import json
import os
import sys
import time

from tqdm.auto import tqdm


def info(msg, *, main_process=True):
    """One log line that does not break an active tqdm bar."""
    if main_process:
        tqdm.write(f"[csd-distill] {msg}", file=sys.stdout)
        sys.stdout.flush()


class MetricsLog:
    """Appends one JSON object per line; every record gets the run name and wall time."""

    def __init__(self, path, run, enabled=True):
        self.path, self.run, self.enabled = path, run, enabled
        self.start = time.time()
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, **record):
        if not self.enabled:
            return
        record = {"run": self.run, "time_s": round(time.time() - self.start, 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
