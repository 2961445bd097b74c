"""CSDGKDTrainer (csd_ext.integrations.trl): CSD replaces GKD's JSD; a training step runs
off-policy (lmbda 0) and on-policy (lmbda 1); the loss is csd_loss on the same shifted logits
with GKD's token normalisation."""

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from distill_helpers import make_tokenizer  # noqa: E402

from csd_ext import csd_loss  # noqa: E402
from csd_ext.integrations.trl import CSDGKDTrainer, GKDConfig  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def setup(tmp_path, lmbda, steps=1):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer(vocab_size=300)
    tok.chat_template = CHAT_TEMPLATE

    def lm(dim, layers, seed):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=dim, n_layer=layers, n_head=2,
                                          eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                          pad_token_id=tok.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.0))

    rows = [{"messages": [{"role": "user", "content": f"Add the two numbers. {i} + {i + 1}"},
                          {"role": "assistant", "content": str(2 * i + 1)}]} for i in range(6)]
    args = GKDConfig(output_dir=str(tmp_path), lmbda=lmbda, max_new_tokens=3, max_steps=steps,
                     per_device_train_batch_size=2, learning_rate=1e-3, use_cpu=True, report_to="none",
                     save_strategy="no", logging_steps=1, max_length=64, disable_tqdm=True, seed=0)
    student, teacher = lm(16, 1, 0), lm(32, 2, 1)
    trainer = CSDGKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok,
                            train_dataset=datasets.Dataset.from_list(rows),
                            csd_kwargs=dict(weighting="SM", alpha=0.3, temperature=1.5))
    return trainer, student, teacher


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_a_step_runs(tmp_path, lmbda):
    trainer, student, _ = setup(tmp_path, lmbda)
    before = [p.detach().clone() for p in student.parameters()]
    trainer.train()
    loss = trainer.state.log_history[0]["loss"]
    assert loss == loss and loss > 0  # finite, positive (CSD is >= 0 and 0 only at t = z + c)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_loss_is_csd_with_gkd_token_normalisation(tmp_path):
    trainer, student, teacher = setup(tmp_path, 0.0)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    labels = batch["labels"][:, 1:]
    assert (labels == -100).any() and (labels != -100).any()  # prompt and padding are masked
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    z = student(**inputs).logits[:, :-1]
    with torch.no_grad():
        t = teacher(**inputs).logits[:, :-1]
    opts = dict(weighting="SM", alpha=0.3, temperature=1.5)
    mean = trainer.compute_loss(student, dict(batch))
    torch.testing.assert_close(mean, csd_loss(z, t, labels, **opts), rtol=1e-5, atol=1e-6)
    n = torch.tensor(37)  # the count of a whole accumulated batch, as transformers passes it
    summed = trainer.compute_loss(student, dict(batch), num_items_in_batch=n)
    torch.testing.assert_close(summed, csd_loss(z, t, labels, reduction="sum", **opts) / 37, rtol=1e-5, atol=1e-6)


def test_bad_csd_kwargs(tmp_path):
    with pytest.raises(ValueError, match="csd_kwargs: unknown key"):
        CSDGKDTrainer(model=None, csd_kwargs=dict(beta=0.1))


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from integration_helpers import reset_accelerate_state

    reset_accelerate_state()
