"""Best-checkpoint selection by dev ROUGE-L, evaluated at the end of every epoch.

The paper (following MiniLLM/DistiLLM) reports the checkpoint with the best
ROUGE-L on the dev prompts, not the last one.  With ``best_checkpoint: true``
the trainer calls :meth:`BestCheckpoint.maybe_evaluate` after each optimiser
step; at each epoch boundary (and at the last step) the student samples
responses to the first ``dev_max_examples`` held-out prompts with the seeds
``dev_seeds``, and when the mean ROUGE-L beats the best so far the student is
saved to ``output_dir/best`` with ``best.json`` beside it.  Ties keep the
earlier checkpoint.  The dev prompts are the held-out items the trainer
validates on (``eval_data`` or the ``eval_holdout`` lines), in the training
prompt template.
"""

import dataclasses
import json
import os


class BestCheckpoint:
    def __init__(self, cfg, tokenizer, dev_items, out_dir, accelerator, *, mixed_precision="no", log=print):
        self.cfg = dataclasses.replace(cfg, eval_seeds=list(cfg.dev_seeds), eval_greedy=False)
        self.tokenizer, self.accelerator, self.log = tokenizer, accelerator, log
        self.items = list(dev_items)[: cfg.dev_max_examples]
        self.mixed_precision = mixed_precision
        self.dir = os.path.join(out_dir, "best")
        self.best = None           # {"dev_rougeL", "step", "epoch"}
        self.epochs_done = 0       # epoch boundaries already evaluated
        if not self.cfg.eval_seeds:
            raise ValueError("best_checkpoint needs at least one dev_seeds entry (sampling seeds of the dev "
                             "evaluation)")

    def due(self, epoch_progress, last_step):
        """True once per completed epoch, and at the last step (a fractional last epoch)."""
        finished = int(epoch_progress + 1e-9)
        if finished > self.epochs_done:
            self.epochs_done = finished
            return True
        return last_step

    def evaluate(self, model, step, epoch):
        """Dev ROUGE-L of ``model`` now; saves it to ``best/`` when it is the best so far.

        A collective under several processes (generation is sharded and the
        save gathers the weights): every rank calls it at the same step.
        """
        from .evaluate import evaluate_model
        from .trainer import save_model

        unwrapped = self.accelerator.unwrap_model(model)
        row, _ = evaluate_model(unwrapped, self.tokenizer, self.items, self.cfg, name=f"dev @ step {step}",
                                mixed_precision=self.mixed_precision, log=self.log)
        score = row["rougeL"]
        record = {"dev_rougeL": score, "step": step, "epoch": round(epoch, 4)}
        improved = self.best is None or score > self.best["dev_rougeL"]
        if improved:
            self.best = dict(record)
            save_model(self.accelerator, model, self.tokenizer, self.dir, extra=record)
            if self.accelerator.is_main_process:
                with open(os.path.join(os.path.dirname(self.dir), "best.json"), "w") as f:
                    json.dump(self.best, f, indent=1)
        self.log(f"dev ROUGE-L {score:.2f} at step {step} (epoch {epoch:.2f}); best {self.best['dev_rougeL']:.2f} "
                 f"at step {self.best['step']}" + (" -> saved " + self.dir if improved else ""))
        return dict(record, dev_best=self.best["dev_rougeL"])

    def restore(self, epoch_progress):
        """After a resume: the epochs already evaluated and the best so far (from best.json)."""
        self.epochs_done = int(epoch_progress + 1e-9)
        path = os.path.join(os.path.dirname(self.dir), "best.json")
        if os.path.isfile(path) and os.path.isdir(self.dir):
            with open(path) as f:
                self.best = json.load(f)

    def maybe_evaluate(self, model, step, epoch_progress, last_step):
        """The trainer's hook: a metrics record when an evaluation ran, else None."""
        if not self.due(epoch_progress, last_step):
            return None
        return self.evaluate(model, step, epoch_progress)
