"""``csd-distill cache-teacher``: run the teacher once over the data and write its logits to disk.

    csd-distill cache-teacher --preset gpt2-xl-to-gpt2 --teacher T --train-data d.jsonl \\
        --output teacher-cache --top-k 0 --dtype fp32
    torchrun --nproc_per_node 8 -m csd_ext.distill cache-teacher ...   # each rank writes its own shards
    csd-distill --preset gpt2-xl-to-gpt2 --student S --train-data d.jsonl --teacher-cache teacher-cache

Every config flag of ``csd-distill`` is accepted (the template, lengths and
held-out split must be those of the training run, which the cache's index
records and the training run checks).  Both the training and the held-out
sequences are cached: validation needs the teacher too.
"""

from .logging_utils import info
from .teacher_cache import TeacherCacheError, run_fingerprint, write_teacher_cache


def add_cache_arguments(parser):
    group = parser.add_argument_group("cache-teacher")
    group.add_argument("--output", required=True, help="directory of the cache (created; resumed if partial)")
    group.add_argument("--top-k", type=int, default=0, help="k most likely ids per token (0: the full logits)")
    group.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="storage dtype")
    group.add_argument("--shard-examples", type=int, default=256, help="sequences per shard")
    group.add_argument("--cache-batch-size", type=int, default=None,
                       help="sequences per teacher forward (default: eval_batch_size)")
    return parser


def cache_teacher(cfg, args):
    """Load the teacher, tokenizer and data that ``cfg`` names and write the cache."""
    import torch
    from accelerate import PartialState

    from .models import freeze_teacher, load_causal_lm, load_tokenizer, resolve_mixed_precision, \
        resolve_teacher_dtype
    from .run import load_data

    if cfg.teacher is None:
        raise TeacherCacheError("cache-teacher needs --teacher (a preset with pipeline: tiny trains its own "
                                "teacher; see docs/teacher_cache.md)")
    if args.top_k < 0:
        raise TeacherCacheError(f"--top-k must be >= 0 (0: full logits), got {args.top_k}")
    state = PartialState(cpu=not torch.cuda.is_available())
    mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    teacher = freeze_teacher(load_causal_lm(cfg.teacher, dtype=resolve_teacher_dtype(cfg.teacher_dtype,
                                                                                     mixed_precision),
                                            trust_remote_code=cfg.trust_remote_code)).to(state.device)
    train_items, eval_items = load_data(cfg, tokenizer)
    info(f"caching teacher {cfg.teacher} on {len(train_items)} training + {len(eval_items)} held-out examples "
         f"({'full logits' if args.top_k == 0 else f'top-{args.top_k}'}, {args.dtype}) into {args.output}, "
         f"{state.num_processes} process(es)", main_process=state.is_main_process)
    return write_teacher_cache(
        args.output, teacher, train_items + eval_items, fingerprint=run_fingerprint(cfg, tokenizer),
        top_k=args.top_k, dtype=args.dtype, teacher_name=cfg.teacher, shard_examples=args.shard_examples,
        batch_size=args.cache_batch_size or cfg.eval_batch_size, rank=state.process_index,
        world=state.num_processes, device=state.device,
        log=lambda m: info(m, main_process=state.is_main_process), progress=state.is_main_process)


def main(argv):
    from .cli import parse_config

    # The student plays no part in caching: any placeholder satisfies the config check.
    args, cfg = parse_config(argv, extend_parser=add_cache_arguments, prog="csd-distill cache-teacher",
                             fill={"student": "(unused by cache-teacher)"})
    if cfg is None:
        return None
    return cache_teacher(cfg, args)
