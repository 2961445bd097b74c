"""Console messages and the metrics JSONL log (main process only)."""

import json
import os
import sys
import time

from tqdm.auto import tqdm


def is_main_rank():
    """False on every process but rank 0 of a torchrun/accelerate launch (RANK is set
    before the process group exists, so this holds while models load too)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def info(msg, *, main_process=True):
    """One log line that does not break an active tqdm bar; rank 0 only."""
    if main_process and is_main_rank():
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
