"""The embedded CPU demo behind ``csd-distill --preset tiny``: synthetic data, a
BPE tokenizer trained on it, a tiny GPT-2 teacher trained by SFT, and students
distilled from it with CSD and with baseline losses.  Nothing is downloaded."""
