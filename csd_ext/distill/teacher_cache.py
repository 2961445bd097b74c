"""Teacher logits cached on disk: write them once, train from them without the teacher.

Layout of a cache directory::

    index.json                         what was cached and from what (see below)
    shard-r000-00000.safetensors       rank 0's first shard, ...
    progress-r000.json                 rank 0's completed shards (for resuming)

Each shard holds ``shard_examples`` distinct training/evaluation sequences:

- ``keys``      uint8 [E, 20]   SHA-1 of each sequence's input ids (int64 bytes);
- ``offsets``   int64 [E + 1]   its rows are ``offsets[e]:offsets[e + 1]``;
- ``positions`` int32 [T]       the position of each row inside its sequence;
- ``values``    dtype [T, W]    full caches (top_k = 0): the teacher's logits, W = V;
                                top-k caches: the teacher's top-k log-probabilities;
- ``ids``       int32 [T, k]    top-k caches only: their vocabulary ids (distinct, sorted
                                by value, descending).

Rows are kept only at the *response* positions (labels != -100): the losses
ignore every other position.  A sequence is looked up by the hash of its
token ids, so a cache serves any batch order, any number of processes and
both the training and the held-out data.  The teacher's logits depend only
on the input ids, so two examples with equal ids share one entry (holding
the union of their response positions).

``index.json`` records the format, the tokenizer's identity (the SHA-256 of
its vocabulary, its size, eos/bos), the teacher's vocabulary size, the data
files' SHA-256, the prompt template and length limits, the dtype, k, the
number of processes that wrote it, and (once complete) every shard's size,
SHA-256 and example count.  :meth:`TeacherCache.check_matches` compares it
with a run and names the first field that differs; opening a cache hashes
every shard and names any that is missing or corrupt.

Writing (:func:`write_teacher_cache`) is resumable: rank ``r`` writes its
shards ``shard-r<r>-<j>`` one at a time (temporary file, fsync, rename), then
adds the shard's SHA-256 to ``progress-r<r>.json`` (atomically).  A killed
run leaves at most a stray temporary file; the next run re-verifies the
shards it lists and continues with the first one missing.  When every rank
is done, rank 0 writes the complete index.

Public API (kept stable for the tiny demo and the trainer):

- :func:`run_fingerprint` -- what a cache must match for a given run;
- :func:`write_teacher_cache` -- run a teacher over encoded items, write shards + index;
- :func:`open_teacher_cache` / :class:`TeacherCache` -- open, verify, check against a run;
- :class:`CachedTeacher` -- what the trainer uses in place of the teacher model:
  ``cached.kd_loss(kd_fn, student_logits, batch, vocab)`` gives the KD term of
  a micro-batch, and ``cached.lookup(input_ids, labels)`` the cached teacher
  rows (:class:`DenseTeacherBatch` / :class:`SparseTeacherBatch`).
"""

import dataclasses
import hashlib
import json
import os
import re

import torch

from .checkpoint import FAULT_ENV, atomic_write_json, fsync_path, inject_fault, sha256_of  # noqa: F401
from .data import IGNORE_INDEX

FORMAT = 1
INDEX = "index.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SHARD = re.compile(r"^shard-r(\d+)-(\d+)\.safetensors$")


class TeacherCacheError(ValueError):
    """A teacher cache that cannot be used as asked; the message names the field or the shard."""


# --- identities -------------------------------------------------------------------------

def tokenizer_identity(tokenizer):
    """What makes two tokenizers interchangeable for logit distillation: the same vocabulary."""
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    return {"vocab_sha256": digest, "size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id}


def run_fingerprint(cfg, tokenizer, data_files=None):
    """The fields a cache must share with a run of ``cfg`` (a DistillConfig).

    ``data_files``: {"train": path, "eval": path or None}; default: the
    config's ``train_data`` / ``eval_data``.  Only the files' contents count
    (SHA-256), not their paths.
    """
    files = data_files or {"train": cfg.train_data, "eval": cfg.eval_data}
    data = {k: (sha256_of(p) if p else None) for k, p in files.items()}
    return {
        "tokenizer": tokenizer_identity(tokenizer),
        "data_sha256": data,
        "eval_holdout": None if files.get("eval") else cfg.eval_holdout,
        "template": cfg.prompt_template,
        "max_length": cfg.max_length,
        "max_prompt_length": cfg.max_prompt_length,
    }


def sequence_key(input_ids):
    """SHA-1 (20 bytes) of a sequence's token ids, as int64 little-endian bytes."""
    ids = torch.as_tensor(input_ids, dtype=torch.int64).contiguous()
    return hashlib.sha1(ids.numpy().tobytes()).digest()


def _response_positions(labels):
    return [i for i, y in enumerate(labels) if y != IGNORE_INDEX]


def unique_sequences(items):
    """[(key, input_ids, sorted response positions)], one per distinct input, in first-seen order."""
    order, by_key = [], {}
    for it in items:
        key = sequence_key(it["input_ids"])
        if key not in by_key:
            by_key[key] = (list(it["input_ids"]), set())
            order.append(key)
        by_key[key][1].update(_response_positions(it["labels"]))
    return [(k, by_key[k][0], sorted(by_key[k][1])) for k in order]


# --- writing ------------------------------------------------------------------------------

def _shard_name(rank, j):
    return f"shard-r{rank:03d}-{j:05d}.safetensors"


def _progress_path(out_dir, rank):
    return os.path.join(out_dir, f"progress-r{rank:03d}.json")


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _settings_mismatch(old, new):
    """The first (field, old, new) that differs between two index headers, or None."""
    for key in sorted(set(old) | set(new)):
        if key in ("shards", "complete", "n_sequences"):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    return f"{key}.{sub}", a.get(sub), b.get(sub)
        elif a != b:
            return key, a, b
    return None


def _teacher_rows(teacher, seqs, *, top_k, dtype, device):
    """Run the teacher on a few sequences (right-padded); return the cached rows of each."""
    width = max(len(ids) for _, ids, _ in seqs)
    input_ids = torch.zeros((len(seqs), width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, (_, ids, _) in enumerate(seqs):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
    position_ids = torch.arange(width).expand(len(seqs), width).clone()
    with torch.no_grad():
        logits = teacher(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         position_ids=position_ids.to(device), use_cache=False).logits
    out = []
    for i, (_, _, positions) in enumerate(seqs):
        rows = logits[i, torch.tensor(positions, dtype=torch.long, device=logits.device)].float()
        if top_k:
            logp = torch.log_softmax(rows, dim=-1)
            values, ids = torch.topk(logp, min(top_k, rows.shape[-1]), dim=-1, sorted=True)
            out.append((values.to(dtype).cpu(), ids.to(torch.int32).cpu()))
        else:
            out.append((rows.to(dtype).cpu(), None))
    return out


def _write_shard(path, seqs, rows):
    """Write one shard atomically: temporary file, fsync, rename."""
    from safetensors.torch import save_file

    lengths = [len(p) for _, _, p in seqs]
    offsets = torch.zeros(len(seqs) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    tensors = {
        "keys": torch.tensor([list(k) for k, _, _ in seqs], dtype=torch.uint8),
        "offsets": offsets,
        "positions": torch.tensor([i for _, _, p in seqs for i in p], dtype=torch.int32),
        "values": torch.cat([v for v, _ in rows]).contiguous(),
    }
    if rows[0][1] is not None:
        tensors["ids"] = torch.cat([i for _, i in rows]).contiguous()
    tmp = path + ".tmp"
    save_file(tensors, tmp)
    fsync_path(tmp)
    inject_fault("cache-shard", int(_SHARD.match(os.path.basename(path)).group(2)))
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def _barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def write_teacher_cache(out_dir, teacher, items, *, fingerprint, top_k=0, dtype="fp32", teacher_name=None,
                        shard_examples=256, batch_size=8, rank=0, world=1, device=None, log=print,
                        progress=True):
    """Run ``teacher`` over encoded ``items`` (dicts with input_ids and labels) and cache its rows.

    ``fingerprint``: :func:`run_fingerprint` of the run the cache is for.
    ``top_k``: 0 caches the full logits, k > 0 the k most likely ids and
    their log-probabilities.  ``dtype``: "fp32", "fp16" or "bf16" (storage).
    Each of the ``world`` processes writes the shards of every ``world``-th
    distinct sequence; all must call this with the same arguments.  Returns
    the path of the index.  Resumes a partial cache written with the same
    settings; refuses one written with other settings, naming the field.
    """
    from tqdm.auto import tqdm

    if dtype not in DTYPES:
        raise TeacherCacheError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise TeacherCacheError(f"top_k must be an integer >= 0 (0: full logits), got {top_k!r}")
    if shard_examples < 1 or batch_size < 1:
        raise TeacherCacheError("shard_examples and batch_size must be >= 1")
    device = device or next(teacher.parameters()).device
    vocab_size = teacher.get_output_embeddings().weight.shape[0]
    if top_k > vocab_size:
        raise TeacherCacheError(f"top_k={top_k} exceeds the teacher's vocabulary size {vocab_size}")
    seqs = unique_sequences(items)
    header = {"format": FORMAT, **fingerprint, "vocab_size": vocab_size, "top_k": top_k, "dtype": dtype,
              "values": "logprobs" if top_k else "logits", "teacher": teacher_name, "world_size": world,
              "shard_examples": shard_examples, "n_sequences": len(seqs)}
    index_path = os.path.join(out_dir, INDEX)
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(index_path):
            old = _read_json(index_path)
            diff = _settings_mismatch(old, header)
            if diff is not None:
                raise TeacherCacheError(f"{out_dir} holds a cache made with {diff[0]}={diff[1]!r}; this run has "
                                        f"{diff[0]}={diff[2]!r}. Use another --output, or delete it to start over")
        else:
            atomic_write_json(index_path, {**header, "complete": False})
    _barrier()
    old = _read_json(index_path)
    diff = _settings_mismatch(old, header)
    if diff is not None:  # ranks > 0 see rank 0's verdict here
        raise TeacherCacheError(f"{out_dir} holds a cache made with {diff[0]}={diff[1]!r}; this run has "
                                f"{diff[0]}={diff[2]!r}")

    mine = seqs[rank::world]
    n_shards = (len(mine) + shard_examples - 1) // shard_examples
    progress_path = _progress_path(out_dir, rank)
    done = _read_json(progress_path)["shards"] if os.path.exists(progress_path) else {}
    for name in list(done):
        full = os.path.join(out_dir, name)
        if not os.path.exists(full) or sha256_of(full) != done[name]["sha256"]:
            log(f"teacher cache: {name} is missing or does not match its hash; writing it again")
            del done[name]
    teacher.eval()
    bar = tqdm(total=len(mine), desc=f"caching teacher (rank {rank})", disable=not progress, dynamic_ncols=True)
    for j in range(n_shards):
        name = _shard_name(rank, j)
        chunk = mine[j * shard_examples:(j + 1) * shard_examples]
        if name in done:
            bar.update(len(chunk))
            continue
        rows = []
        for b in range(0, len(chunk), batch_size):
            rows += _teacher_rows(teacher, chunk[b:b + batch_size], top_k=top_k, dtype=DTYPES[dtype],
                                  device=device)
            bar.update(len(chunk[b:b + batch_size]))
        path = os.path.join(out_dir, name)
        _write_shard(path, chunk, rows)
        done[name] = {"sha256": sha256_of(path), "size": os.path.getsize(path), "sequences": len(chunk),
                      "rows": sum(len(p) for _, _, p in chunk), "rank": rank}
        atomic_write_json(progress_path, {"shards": done, "n_shards": n_shards})
    bar.close()
    if not os.path.exists(progress_path):  # a rank with no sequence at all
        atomic_write_json(progress_path, {"shards": {}, "n_shards": 0})
    _barrier()
    if rank == 0:
        shards = {}
        for r in range(world):
            shards.update(_read_json(_progress_path(out_dir, r))["shards"])
        atomic_write_json(index_path, {**header, "complete": True, "shards": dict(sorted(shards.items()))})
        total = sum(s["size"] for s in shards.values())
        log(f"teacher cache: {len(seqs)} sequences, {sum(s['rows'] for s in shards.values())} response rows, "
            f"{len(shards)} shards, {total / 2**20:.1f} MiB in {out_dir}")
    _barrier()
    return index_path


# --- reading ------------------------------------------------------------------------------

@dataclasses.dataclass
class DenseTeacherBatch:
    """Cached full teacher logits ``[B, L, V]`` (0 where nothing is cached) and the cached-row mask."""
    logits: torch.Tensor
    cached: torch.Tensor


@dataclasses.dataclass
class SparseTeacherBatch:
    """Cached top-k teacher rows: ``ids`` int64 ``[B, L, k]`` (-1 where nothing is cached) and
    ``values`` (log-probabilities) ``[B, L, k]``; the form :func:`csd_ext.sparse_csd_loss` takes."""
    ids: torch.Tensor
    values: torch.Tensor
    cached: torch.Tensor


class TeacherCache:
    """An opened cache directory: its index, and the location of every cached sequence."""

    def __init__(self, path, *, verify=True):
        self.path = path
        index_path = os.path.join(path, INDEX)
        if not os.path.isfile(index_path):
            raise TeacherCacheError(f"{path} is not a teacher cache: it has no {INDEX} "
                                    f"(write one with `csd-distill cache-teacher`)")
        try:
            self.index = _read_json(index_path)
        except (OSError, json.JSONDecodeError) as exc:
            raise TeacherCacheError(f"{index_path} is not readable JSON ({exc})") from None
        if self.index.get("format") != FORMAT:
            raise TeacherCacheError(f"{index_path}: format {self.index.get('format')!r}, expected {FORMAT}")
        if not self.index.get("complete"):
            raise TeacherCacheError(f"{path} is incomplete (its writer was stopped): run the same "
                                    f"`csd-distill cache-teacher` command again to finish it")
        self.top_k = self.index["top_k"]
        self.vocab_size = self.index["vocab_size"]
        if verify:
            self.verify()
        self._where = {}
        self._handles = {}
        for name in self.index["shards"]:
            keys = self._open(name).get_tensor("keys")
            for e, key in enumerate(keys.numpy()):
                self._where[bytes(key)] = (name, e)

    def verify(self):
        """Hash every shard; raise naming the first that is missing or whose SHA-256 differs."""
        for name, meta in self.index["shards"].items():
            full = os.path.join(self.path, name)
            if not os.path.isfile(full):
                raise TeacherCacheError(f"teacher cache {self.path}: shard {name} is missing")
            if os.path.getsize(full) != meta["size"] or sha256_of(full) != meta["sha256"]:
                raise TeacherCacheError(f"teacher cache {self.path}: shard {name} is corrupt (its SHA-256 "
                                        f"does not match the index); write the cache again")

    def _open(self, name):
        from safetensors import safe_open

        if name not in self._handles:
            try:
                self._handles[name] = safe_open(os.path.join(self.path, name), framework="pt")
            except Exception as exc:  # a missing or unparsable file
                raise TeacherCacheError(f"teacher cache {self.path}: shard {name} cannot be read ({exc})") from None
        return self._handles[name]

    def check_matches(self, fingerprint):
        """Refuse a cache made for another run: name the first field of ``fingerprint`` that differs."""
        labels = {"tokenizer": "tokenizer", "data_sha256": "data", "template": "template",
                  "eval_holdout": "held-out split", "max_length": "max_length",
                  "max_prompt_length": "max_prompt_length"}
        for key, value in fingerprint.items():
            cached = self.index.get(key)
            if cached != value:
                what = labels.get(key, key)
                if isinstance(value, dict) and isinstance(cached, dict):
                    sub = next(s for s in sorted(set(value) | set(cached)) if value.get(s) != cached.get(s))
                    detail = f"{key}.{sub}: cache {cached.get(sub)!r}, run {value.get(sub)!r}"
                else:
                    detail = f"cache {cached!r}, run {value!r}"
                raise TeacherCacheError(f"teacher cache {self.path} does not match this run: the {what} "
                                        f"differs ({detail})")

    def __contains__(self, input_ids):
        return sequence_key(input_ids) in self._where

    def rows(self, input_ids):
        """(positions int64 [T], values [T, W], ids int64 [T, k] or None) of one sequence."""
        key = sequence_key(input_ids)
        if key not in self._where:
            raise TeacherCacheError(f"teacher cache {self.path} holds no entry for a sequence of "
                                    f"{len(input_ids)} tokens: was it written for this data?")
        name, e = self._where[key]
        f = self._open(name)
        offsets = f.get_slice("offsets")[e:e + 2]
        a, b = int(offsets[0]), int(offsets[1])
        positions = f.get_slice("positions")[a:b].to(torch.int64)
        values = f.get_slice("values")[a:b]
        ids = f.get_slice("ids")[a:b].to(torch.int64) if self.top_k else None
        return positions, values, ids

    def lookup(self, input_ids, attention_mask=None, labels=None, device=None):
        """The cached teacher rows of a right-padded batch, as a Dense/SparseTeacherBatch.

        Reads ``input_ids`` (and ``labels``) on the host: one device-to-host
        copy per batch, before the loss.  With ``labels``, a position that
        counts (label != -100) but has no cached row is an error.
        """
        ids_cpu = input_ids.detach().cpu()
        lengths = (attention_mask.detach().cpu().sum(-1).tolist() if attention_mask is not None
                   else [ids_cpu.shape[1]] * ids_cpu.shape[0])
        B, L = ids_cpu.shape
        cached = torch.zeros((B, L), dtype=torch.bool)
        if self.top_k:
            out_ids = torch.full((B, L, self.top_k), -1, dtype=torch.int64)
            out_values = torch.zeros((B, L, self.top_k), dtype=DTYPES[self.index["dtype"]])
        else:
            out_values = torch.zeros((B, L, self.vocab_size), dtype=DTYPES[self.index["dtype"]])
        for i in range(B):
            positions, values, ids = self.rows(ids_cpu[i, :int(lengths[i])])
            cached[i, positions] = True
            out_values[i, positions] = values
            if self.top_k:
                out_ids[i, positions] = ids
        if labels is not None:
            missing = (labels.detach().cpu() != IGNORE_INDEX) & ~cached
            if bool(missing.any()):
                row, pos = missing.nonzero()[0].tolist()
                raise TeacherCacheError(f"teacher cache {self.path}: batch row {row}, position {pos} is a "
                                        f"response token with no cached teacher row")
        move = (lambda t: t.to(device, non_blocking=True)) if device is not None else (lambda t: t)
        if self.top_k:
            return SparseTeacherBatch(move(out_ids), move(out_values), move(cached))
        return DenseTeacherBatch(move(out_values), move(cached))

    def missing(self, items):
        """How many of ``items`` (encoded examples) have no cached entry."""
        return sum(1 for it in items if it["input_ids"] not in self)


def open_teacher_cache(path, fingerprint=None, *, verify=True):
    """Open (and by default hash-verify) a cache; with ``fingerprint``, refuse one made for another run."""
    cache = TeacherCache(path, verify=verify)
    if fingerprint is not None:
        cache.check_matches(fingerprint)
    return cache


def densify(sparse, vocab_size):
    """A top-k batch as full logits: log-probabilities on the support, -inf elsewhere (for
    losses other than CSD; memory [B, L, V])."""
    out = torch.full((*sparse.ids.shape[:-1], vocab_size), float("-inf"), dtype=torch.float32,
                     device=sparse.ids.device)
    valid = sparse.ids >= 0
    # Padding (-1) writes nothing (a scatter of -inf to a clamped id could overwrite a real entry).
    rows = torch.arange(out[..., 0].numel(), device=out.device).reshape(out.shape[:-1])
    out.view(-1, vocab_size)[rows.unsqueeze(-1).expand(sparse.ids.shape)[valid], sparse.ids[valid]] = \
        sparse.values.float()[valid]
    # Rows with nothing cached are ignored by the loss; keep them finite so no loss sees NaN.
    return torch.where(sparse.cached.unsqueeze(-1), out, torch.zeros((), device=out.device))


class CachedTeacher:
    """Stands in for the teacher model in the training loop (``trainer.distill_loss``).

    ``loss`` / ``loss_args``: the run's KD loss.  With a top-k cache, CSD runs
    as :func:`csd_ext.sparse_csd_loss` on the k cached entries; any other loss
    sees the -inf-masked full logits (:func:`densify`).
    """

    is_teacher_cache = True

    def __init__(self, cache, loss="csd", loss_args=None):
        self.cache = cache
        self.loss = loss
        self.loss_args = dict(loss_args or {})
        self.device = None

    def to(self, device):
        self.device = torch.device(device)
        return self

    def eval(self):
        return self

    def lookup(self, batch):
        return self.cache.lookup(batch["input_ids"], batch.get("attention_mask"), batch["labels"],
                                 device=self.device or batch["input_ids"].device)

    def kd_loss(self, kd_fn, student_logits, batch, vocab=None):
        """The KD term of a micro-batch (token mean over its response positions)."""
        labels = batch["labels"]
        with torch.no_grad():
            teacher = self.lookup(batch)
        if isinstance(teacher, DenseTeacherBatch):
            t = teacher.logits if vocab is None else teacher.logits[..., :vocab]
            return kd_fn(student_logits, t, labels)
        ids, values = teacher.ids, teacher.values
        if vocab is not None:  # entries past the shared vocabulary are not the student's
            ids = torch.where(ids < vocab, ids, torch.full_like(ids, -1))
        if self.loss == "csd":
            from ..sparse import sparse_csd_loss

            # The ids were checked when the cache was written (distinct, in range) and the shards are
            # hash-verified: skip the per-call check and its host sync.
            return sparse_csd_loss(student_logits, ids, values, labels, check_ids=False, **self.loss_args)
        return kd_fn(student_logits, densify(SparseTeacherBatch(ids, values, teacher.cached),
                                             student_logits.shape[-1]), labels)

    def check_items(self, items):
        """Refuse, before training, data with sequences the cache does not hold."""
        missing = self.cache.missing(items)
        if missing:
            raise TeacherCacheError(f"teacher cache {self.cache.path} holds no entry for {missing} of the "
                                    f"{len(items)} training/evaluation sequences of this run")


def load_student_and_cache(cfg, mixed_precision, log=print):
    """(CachedTeacher, student, tokenizer, vocab) for ``--teacher-cache``: the teacher is not loaded.

    The cache is hash-verified and checked against the run (tokenizer, data,
    template, length limits); the student's head must match the cached
    vocabulary, or both are sliced to the tokenizer's size when that fits.
    """
    from ..losses import canonical_name
    from .models import ModelError, load_pair, output_vocab_size

    _, student, tokenizer = load_pair(dataclasses.replace(cfg, kd_ratio=0.0), mixed_precision, log=log)
    cache = open_teacher_cache(cfg.teacher_cache, run_fingerprint(cfg, tokenizer))
    vt, vs = cache.vocab_size, output_vocab_size(student)
    vocab = None
    if vt != vs:
        vocab = len(tokenizer)
        if vocab > min(vt, vs):
            raise ModelError(f"teacher cache {cfg.teacher_cache} does not match this run: the vocabulary "
                             f"differs (cached teacher head {vt}, student head {vs}, tokenizer {vocab})")
        log(f"vocab sizes differ (cached teacher {vt}, student head {vs}): slicing both to {vocab}")
    log(f"teacher: cached in {cfg.teacher_cache} ({'full logits' if not cache.top_k else f'top-{cache.top_k}'}, "
        f"{cache.index['dtype']}, {len(cache.index['shards'])} shards, teacher {cache.index.get('teacher')}); "
        f"the teacher model is not loaded")
    return CachedTeacher(cache, canonical_name(cfg.loss), cfg.loss_args), student, tokenizer, vocab
