"""Crash-safe training checkpoints and ``--resume``.

Layout: ``<output_dir>/checkpoint-<step>/`` holds

- what ``accelerate`` saves with ``save_state``: the model (``model.safetensors``;
  sharded files under FSDP/DeepSpeed), the optimiser, the LR scheduler (a
  registered object), the GradScaler with fp16, and one RNG file per process
  (python, numpy, torch, CUDA);
- ``trainer_state_rank<r>.json`` per process: optimiser step, data-stream
  positions, the on-policy replay buffer and its generators, the open
  logging window (each rank's buffer is its own);
- ``manifest.json``: the size and SHA-256 of every other file, written last.

A checkpoint is first written under ``.tmp-checkpoint-<step>``; every file is
fsynced, the manifest is written (temp file, fsync, rename), the directory is
fsynced, renamed to its final name, and the parent directory is fsynced.  A
kill at any moment leaves either no new directory or a complete one (a
leftover ``.tmp-*`` is ignored and cleared).  A directory whose files do not
match its manifest (truncated, corrupted, missing) is reported by name and
skipped: resuming falls back to the newest checkpoint that verifies.

Rank 0 alone writes the manifest and renames; every rank writes only its own
RNG and trainer-state files into the temporary directory.  The directory must
therefore be on a filesystem every rank sees (as accelerate assumes).
"""

import hashlib
import json
import os
import re
import shutil
import signal
import time

MANIFEST = "manifest.json"
FORMAT = 1
_NAME = re.compile(r"^checkpoint-(\d+)$")
_CHUNK = 1 << 20

# Fault injection for the crash-safety tests: CSD_DISTILL_FAULT="<point>:<step>"
# SIGKILLs this process at that point (points: "after-step", "mid-checkpoint").
FAULT_ENV = "CSD_DISTILL_FAULT"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory and the reason."""


def inject_fault(point, step):
    if os.environ.get(FAULT_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


# --- durable file operations ---------------------------------------------------------

def fsync_path(path):
    """fsync a file or a directory (a directory's fsync makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(directory)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_under(root):
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            out.append(os.path.relpath(full, root))
    return sorted(out)


# --- writing ---------------------------------------------------------------------------

def finalize_checkpoint(tmp_dir, final_dir, meta):
    """fsync every file of ``tmp_dir``, write its manifest, and rename it to ``final_dir``."""
    files = {}
    for rel in _files_under(tmp_dir):
        if rel == MANIFEST:
            continue
        full = os.path.join(tmp_dir, rel)
        fsync_path(full)
        files[rel] = {"size": os.path.getsize(full), "sha256": sha256_of(full)}
    for dirpath, _, _ in os.walk(tmp_dir):
        fsync_path(dirpath)
    atomic_write_json(os.path.join(tmp_dir, MANIFEST), {"format": FORMAT, **meta, "files": files})
    os.rename(tmp_dir, final_dir)  # atomic: readers see no directory or a complete one
    fsync_path(os.path.dirname(os.path.abspath(final_dir)))


# --- reading ---------------------------------------------------------------------------

def checkpoint_step(name):
    m = _NAME.match(os.path.basename(os.path.normpath(name)))
    return int(m.group(1)) if m else None


def list_checkpoints(out_dir):
    """[(step, path)] of directories named checkpoint-<step>, newest first."""
    if not os.path.isdir(out_dir):
        return []
    found = [(checkpoint_step(n), os.path.join(out_dir, n)) for n in os.listdir(out_dir)]
    return sorted(((s, p) for s, p in found if s is not None and os.path.isdir(p)), reverse=True)


def verify_checkpoint(path):
    """The manifest of ``path`` when every listed file is present with its size and SHA-256;
    else CheckpointError saying what is wrong."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {MANIFEST} (interrupted while saving?)")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: manifest format {manifest.get('format')!r}, expected {FORMAT}")
    for rel, want in sorted(files.items()):
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CheckpointError(f"checkpoint {path} is corrupt: {rel} is missing")
        size = os.path.getsize(full)
        if size != want["size"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {rel} has {size} bytes, the manifest says "
                                  f"{want['size']} (truncated or overwritten)")
        digest = sha256_of(full)
        if digest != want["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {rel} has SHA-256 {digest[:16]}..., the manifest "
                                  f"says {want['sha256'][:16]}...")
    return manifest


def latest_valid_checkpoint(out_dir, log=print):
    """(path, manifest) of the newest checkpoint that verifies, or None when there is none at all.

    Each newer checkpoint that fails verification is reported and skipped (the
    fallback to the previous one); if checkpoints exist but none verifies,
    CheckpointError lists why.
    """
    found = list_checkpoints(out_dir)
    problems = []
    for _, path in found:
        try:
            manifest = verify_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            log(f"{exc}; falling back to an earlier checkpoint")
            continue
        return path, manifest
    if problems:
        raise CheckpointError("no usable checkpoint in " + out_dir + ":\n  " + "\n  ".join(problems))
    return None


def quarantine(path):
    """Rename an unusable checkpoint out of the way (kept for inspection, never loaded)."""
    target = f"{path}.invalid-{int(time.time())}"
    os.rename(path, target)
    return target


# --- the trainer's side ----------------------------------------------------------------

class CheckpointManager:
    """Saves and restores everything a bit-exact resume needs, through ``accelerator``.

    ``fingerprint``: settings that fix the data order and batch layout (world
    size, batch size, accumulation, seed, dataset size); resuming under other
    values is refused, since the data position would no longer mean the same
    examples.
    """

    def __init__(self, out_dir, accelerator, fingerprint, keep=0, log=print):
        self.out_dir, self.accelerator, self.fingerprint = out_dir, accelerator, dict(fingerprint)
        self.keep, self.log = keep, log
        self.resumed_from = None

    @property
    def rank(self):
        return self.accelerator.process_index

    def _state_file(self, directory, rank=None):
        return os.path.join(directory, f"trainer_state_rank{self.rank if rank is None else rank}.json")

    def check_fresh_start(self):
        """A run without --resume must not mix with an earlier run's checkpoints."""
        existing = list_checkpoints(self.out_dir)
        if existing:
            raise CheckpointError(
                f"{self.out_dir} already holds checkpoints ({os.path.basename(existing[0][1])} is the newest): "
                f"pass --resume to continue that run, or choose another --output-dir")

    def save(self, step, trainer_state):
        """Write checkpoint-<step> atomically (a collective: every rank calls it)."""
        acc = self.accelerator
        final = os.path.join(self.out_dir, f"checkpoint-{step}")
        tmp = os.path.join(self.out_dir, f".tmp-checkpoint-{step}")
        if acc.is_main_process:
            os.makedirs(self.out_dir, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)  # debris of a save that was killed
            os.makedirs(tmp)
        acc.wait_for_everyone()
        acc.save_state(tmp, safe_serialization=True)
        atomic_write_json(self._state_file(tmp), trainer_state)
        acc.wait_for_everyone()
        inject_fault("mid-checkpoint", step)
        if acc.is_main_process:
            if os.path.exists(final):  # an unusable leftover with this step's name (resume skipped it)
                quarantine(final)
            finalize_checkpoint(tmp, final, {"step": step, "world_size": acc.num_processes,
                                             "fingerprint": self.fingerprint})
            self._prune()
        acc.wait_for_everyone()
        return final

    def _prune(self):
        if self.keep <= 0:
            return
        for _, path in list_checkpoints(self.out_dir)[self.keep:]:
            doomed = os.path.join(self.out_dir, f".deleting-{os.path.basename(path)}")
            os.rename(path, doomed)  # never leave a half-deleted directory under a checkpoint name
            shutil.rmtree(doomed, ignore_errors=True)

    def resume(self):
        """Restore the newest valid checkpoint; returns this rank's trainer state, or None
        (nothing to resume: a fresh start).  Rank 0 verifies and chooses; the others follow."""
        acc = self.accelerator
        choice = [None]
        if acc.is_main_process:
            try:
                found = latest_valid_checkpoint(self.out_dir, log=self.log)
                choice = [("ok", found)]
                if found is not None:
                    # Unusable checkpoints newer than the one resumed would collide with new saves.
                    for step, other in list_checkpoints(self.out_dir):
                        if step > found[1]["step"]:
                            self.log(f"moved unusable checkpoint aside: {quarantine(other)}")
            except CheckpointError as exc:
                choice = [("error", str(exc))]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(choice, from_process=0)
        status, found = choice[0]
        if status == "error":
            raise CheckpointError(found)
        if found is None:
            self.log(f"--resume: no checkpoint in {self.out_dir}; starting from step 0")
            return None
        path, manifest = found
        if manifest.get("world_size") != acc.num_processes:
            raise CheckpointError(f"checkpoint {path} was written by {manifest.get('world_size')} process(es); "
                                  f"resume it with the same number (this run has {acc.num_processes})")
        saved = manifest.get("fingerprint", {})
        diff = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if saved.get(k) != v}
        if diff:
            raise CheckpointError(f"checkpoint {path} was written with other settings that fix the data order: "
                                  + ", ".join(f"{k} {a!r} (now {b!r})" for k, (a, b) in sorted(diff.items())))
        acc.load_state(path)
        with open(self._state_file(path)) as f:
            state = json.load(f)
        self.resumed_from = path
        self.log(f"resumed from {path} (step {manifest['step']})")
        return state


def truncate_metrics(path, run, step):
    """Drop ``run``'s metric records after ``step`` (written before a crash, about to be redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines
            if not ((r := json.loads(line)).get("run") == run and r.get("step", 0) > step)]
    if len(kept) != len(lines):
        atomic_write_bytes(path, "".join(kept).encode())
