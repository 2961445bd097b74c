"""On-policy distillation (ImitKD with a replay buffer, as in the paper's on-policy runs).

With probability ``student_gen_ratio`` per micro-batch, the student samples a
response to each of the batch's prompts (temperature / top-p / top-k / max
new tokens as configured).  The prompt + sampled response become training
examples, go into a FIFO replay buffer, and the micro-batch actually trained
on is drawn uniformly from the buffer.  Other micro-batches train on the
dataset's own responses (teacher forcing), as in DistiLLM.

The teacher then scores the generated sequences through the ordinary
distillation step: it sees exactly the student's input ids, mask and
positions, and the KD loss covers the generated tokens only.

Alignment (the paper's code is off by one here): with prompt p_0..p_{P-1}
and generated g_0..g_{G-1},

    full   = p_0 .. p_{P-1} g_0 .. g_{G-1}
    input  = full[:-1]
    labels = full[1:], the first P-1 set to -100

so ``labels[i]`` is the token that follows ``input[i]``; position P-1 (the
last prompt token) predicts g_0, and position P+G-2 predicts g_{G-1}.  Every
generated token, including the first and an eos the student chose, is
predicted exactly once, and no prompt token is.
"""

import torch

from .data import IGNORE_INDEX, left_padded_prompts
from .replay_buffer import ReplayBuffer, make_rng, rng_state, set_rng_state


def generated_example(prompt_ids, generated_ids, *, eos_token_id, max_length):
    """{'input_ids', 'labels', 'prompt_ids'} for prompt + the student's continuation.

    ``generated_ids`` is what ``generate`` appended (cut after the first eos,
    which is kept: stopping is one of the student's decisions; padding after it
    is dropped).  At most ``max_length`` input tokens, like the dataset's
    examples.  None when nothing of the response fits.
    """
    from .stops import cut_at_stop_ids

    # eos_token_id: one id or a list (the model's generation_config stop ids).
    stops = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    gen = cut_at_stop_ids(generated_ids, stops, keep_stop=True)
    prompt = list(prompt_ids)
    full = (prompt + gen)[: max_length + 1]
    n_prompt = len(prompt)
    if len(full) <= n_prompt or n_prompt == 0:
        return None
    input_ids, labels = full[:-1], full[1:]
    labels = [IGNORE_INDEX] * (n_prompt - 1) + labels[n_prompt - 1:]
    return {"input_ids": input_ids, "labels": labels, "prompt_ids": prompt}


@torch.no_grad()
def sample_responses(model, tokenizer, prompt_ids, *, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=256,
                     synced_gpus=False, mixed_precision="no"):
    """The new token ids the model samples after each prompt (one call, left-padded batch)."""
    from transformers import GenerationConfig

    from .evaluate import _autocast
    from .stops import stop_token_ids

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout while sampling
    input_ids, attention_mask = left_padded_prompts(prompt_ids, tokenizer.pad_token_id)
    config = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k,
                              max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=stop_token_ids(model, tokenizer))
    try:
        with _autocast(device, mixed_precision):
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 generation_config=config, synced_gpus=synced_gpus)
    finally:
        model.train(was_training)
    width = input_ids.shape[1]
    return [out[row, width:].tolist() for row in range(out.shape[0])]


class OnPolicy:
    """Decides per micro-batch whether the student generates, keeps the replay buffer,
    and hands the loop the examples to train on.

    The coin is seeded identically on every rank, so all ranks generate on the
    same steps (no rank waits on another's sampling); buffer draws use a
    per-rank generator, since each rank owns its buffer.
    """

    def __init__(self, cfg, tokenizer, *, rank=0, synced_gpus=False, mixed_precision="no"):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.ratio = cfg.student_gen_ratio
        self.buffer = ReplayBuffer(cfg.replay_buffer_size)
        self.coin = make_rng(cfg.seed)
        self.picker = make_rng(cfg.seed * 1_000_003 + rank + 1)
        self.synced_gpus, self.mixed_precision = synced_gpus, mixed_precision
        self.stats = {"generated_batches": 0, "generated_tokens": 0, "generated_sequences": 0}

    def training_items(self, items, model):
        """(examples to train on, whether the student generated for this micro-batch)."""
        if self.coin.random() >= self.ratio:
            return items, False
        prompts = [it["prompt_ids"] for it in items]
        room = self.cfg.max_length + 1 - min(len(p) for p in prompts)  # longer continuations are cut anyway
        new = sample_responses(model, self.tokenizer, prompts, temperature=self.cfg.gen_temperature,
                               top_p=self.cfg.gen_top_p, top_k=self.cfg.gen_top_k,
                               max_new_tokens=max(1, min(self.cfg.gen_max_new_tokens, room)),
                               synced_gpus=self.synced_gpus, mixed_precision=self.mixed_precision)
        from .stops import stop_token_ids

        stops = stop_token_ids(model, self.tokenizer)
        made = [generated_example(p, g, eos_token_id=stops, max_length=self.cfg.max_length)
                for p, g in zip(prompts, new)]
        made = [m for m in made if m is not None]
        self.buffer.push(made)
        self.stats["generated_batches"] += 1
        self.stats["generated_sequences"] += len(made)
        self.stats["generated_tokens"] += sum(sum(x != IGNORE_INDEX for x in m["labels"]) for m in made)
        if len(self.buffer) == 0:
            return items, False
        return self.buffer.sample(len(items), self.picker), True

    def state_dict(self):
        return {"buffer": self.buffer.state_dict(), "coin": rng_state(self.coin),
                "picker": rng_state(self.picker), "stats": dict(self.stats)}

    def load_state_dict(self, state):
        self.buffer.load_state_dict(state["buffer"])
        set_rng_state(self.coin, state["coin"])
        set_rng_state(self.picker, state["picker"])
        self.stats = dict(state["stats"])
