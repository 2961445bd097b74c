"""Evaluation by generation, as in the paper: sampled responses (temperature 1,
top-p 1, several seeds) scored by ROUGE-L against the references, a diversity
figure (distinct-n), and optionally greedy decoding scored by exact match
(GSM8K style: the number after '####') and agreement with the teacher.
"""

import contextlib
import json
import os
import re
import statistics

import torch

from .data import left_padded_prompts


def _autocast(device, mixed_precision):
    if device.type == "cuda" and mixed_precision in ("fp16", "bf16"):
        return torch.autocast("cuda", dtype=torch.float16 if mixed_precision == "fp16" else torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def generate(model, tokenizer, prompt_ids, *, do_sample, seed=None, max_new_tokens=256, batch_size=16,
             no_repeat_ngram_size=0, mixed_precision="no", synced_gpus=False, stop_strings=()):
    """Decode a response for every prompt (token id lists); returns strings cut at the first stop.

    Prompts are batched by length with left padding (so each row continues at
    the end); sampling uses temperature 1, top-p 1 and no top-k, the paper's
    setting, seeded once per call.  Generation stops at every id of
    ``stops.stop_token_ids`` (the tokenizer's eos and the model's
    generation_config list: a chat model's end of turn) and at any of
    ``stop_strings``; the text is cut before the stop.
    """
    from transformers import GenerationConfig, set_seed

    from .stops import cut_at_stop_ids, cut_at_stop_strings, stop_token_ids

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    stop_ids = stop_token_ids(model, tokenizer)
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids)
    if no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = no_repeat_ngram_size
    if do_sample:
        kwargs.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    else:
        kwargs.update(do_sample=False)
    gen_config = GenerationConfig(**kwargs)
    if seed is not None:
        set_seed(seed)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    outputs = [None] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        input_ids, attention_mask = left_padded_prompts([prompt_ids[i] for i in idx], tokenizer.pad_token_id)
        with _autocast(device, mixed_precision):
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 generation_config=gen_config, synced_gpus=synced_gpus,
                                 **stop_string_criteria(tokenizer, input_ids.shape[1], stop_strings))
        for row, i in enumerate(idx):
            new = cut_at_stop_ids(out[row, input_ids.shape[1]:].tolist(), stop_ids)
            text = tokenizer.decode(new, skip_special_tokens=True)
            outputs[i] = cut_at_stop_strings(text, stop_strings).strip()
    model.train(was_training)
    return outputs


def stop_string_criteria(tokenizer, prompt_width, stop_strings):
    """generate() kwargs that end a row once its generated text contains a stop string.

    Only the generated text is searched (transformers' own ``stop_strings``
    also matches across the end of the prompt, so a prompt ending in ``"\n"``
    would stop a ``"\n\n"`` row after one newline).
    """
    if not stop_strings:
        return {}
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _StopStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, prompt_width:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stop_strings) for t in texts], device=input_ids.device)

    return {"stopping_criteria": StoppingCriteriaList([_StopStrings()])}


_SCORER = None


def rouge_l(predictions, references):
    """Mean ROUGE-L F1 (x100), rouge-score with Porter stemming (MiniLLM/DistiLLM's setting)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [_SCORER.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return 100.0 * sum(scores) / max(len(scores), 1)


def normalise_text(s):
    return " ".join(s.strip().split())


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm8k_answer(text, strict=False):
    """The number after '####' (GSM8K's answer line), else (``strict=False``) the last number.

    The paper counts a prediction only when it has a '####' line: model
    outputs are read with ``strict=True``.
    """
    if strict and "####" not in text:
        return None
    tail = text.split("####")[-1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    try:
        return float(found[0 if "####" in text else -1].replace(",", ""))
    except ValueError:
        return None


def is_correct(prediction, reference, answer_format="text"):
    if answer_format == "gsm8k":
        want, got = gsm8k_answer(reference), gsm8k_answer(prediction, strict=True)
        return want is not None and got is not None and abs(want - got) < 1e-6
    return normalise_text(prediction) == normalise_text(reference)


def exact_match(predictions, references, answer_format="text"):
    hits = [is_correct(p, r, answer_format) for p, r in zip(predictions, references)]
    return 100.0 * sum(hits) / max(len(hits), 1)


def distinct_n(texts, n=2):
    """Distinct-n (%): unique n-grams / all n-grams over a set of responses.

    Words as ROUGE sees them (rouge-score's tokenizer: lower-case alphanumeric
    runs), so "a-b-c" is three words; None when no response has n words.
    """
    from rouge_score.tokenizers import DefaultTokenizer

    tokenizer = DefaultTokenizer(use_stemmer=False)
    grams = [tuple(words[i:i + n]) for t in texts for words in [tokenizer.tokenize(t)]
             for i in range(len(words) - n + 1)]
    return 100.0 * len(set(grams)) / len(grams) if grams else None


def evaluate_model(model, tokenizer, items, cfg, *, name, out_dir=None, teacher_greedy=None,
                   mixed_precision="no", log=print):
    """Score one model on encoded eval items; writes its generations to JSONL when out_dir is given.

    Under several processes the prompts are split across ranks and the outputs
    gathered (distributed.generate_sharded); every rank computes the same
    scores, rank 0 alone writes and logs.
    """
    from .distributed import generate_sharded
    from .logging_utils import is_main_rank

    prompts = [it["prompt_ids"] for it in items]
    refs = [it["reference"] for it in items]
    common = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                  no_repeat_ngram_size=cfg.no_repeat_ngram_size, mixed_precision=mixed_precision,
                  stop_strings=tuple(cfg.stop_strings))
    result = {"name": name, "n_prompts": len(items)}
    generations = {}
    per_seed = []
    for seed in cfg.eval_seeds:
        outs = generate_sharded(model, tokenizer, prompts, do_sample=True, seed=seed, **common)
        generations[f"sample_seed{seed}"] = outs
        per_seed.append((rouge_l(outs, refs), exact_match(outs, refs, cfg.answer_format), distinct_n(outs, 2)))
    if per_seed:
        rl, em, d2 = zip(*per_seed)
        result.update(rougeL=statistics.mean(rl), rougeL_sd=statistics.pstdev(rl), exact_match=statistics.mean(em),
                      seeds=list(cfg.eval_seeds), rougeL_per_seed=list(rl))
        if all(d is not None for d in d2):
            result["distinct_2"] = statistics.mean(d2)
    if cfg.eval_greedy:
        outs = generate_sharded(model, tokenizer, prompts, do_sample=False, **common)
        generations["greedy"] = outs
        result.update(greedy_rougeL=rouge_l(outs, refs), greedy_exact_match=exact_match(outs, refs, cfg.answer_format))
        if teacher_greedy is not None:
            same = [normalise_text(a) == normalise_text(b) for a, b in zip(outs, teacher_greedy)]
            result["teacher_agreement"] = 100.0 * sum(same) / max(len(same), 1)
            result["rougeL_vs_teacher"] = rouge_l(outs, teacher_greedy)
    if out_dir is not None and is_main_rank():
        os.makedirs(out_dir, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")
        with open(os.path.join(out_dir, f"generations-{slug}.jsonl"), "w") as f:
            for i, it in enumerate(items):
                row = {"prompt": it["prompt"], "reference": it["reference"]}
                row.update({k: v[i] for k, v in generations.items()})
                f.write(json.dumps(row) + "\n")
    if is_main_rank():
        log(f"eval {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items() if isinstance(v, float)))
    return result, generations.get("greedy")
