"""Inputs, a loss, a training loop and a resume for learner checks (tests/workers/*, scripts/gpu_check_worker.py):
fixed token sequences and a token-mean negative log-likelihood, the same in every check so their numbers compare."""
import torch


def fixed_sequences(vocab: int) -> list:
    """Six sequences of 9..40 tokens drawn from [3, vocab) with a fixed generator."""
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (n,), generator=g) for n in (17, 9, 30, 24, 12, 40)]


def nll_loss_fn(total_tokens: int):
    """Learner.train_step loss: token-mean negative log-likelihood over the whole batch (global normaliser)."""
    def loss_fn(logprobs, mb):
        mask = mb.target_mask.float()
        return -(logprobs * mask).sum() / total_tokens, {"tokens": mask.sum()}
    return loss_fn


def logprob_sum(learner, seqs: list) -> float:
    """The learner's summed log-probs of `seqs` (compares a model before a save with the one after the load)."""
    return float(sum(lp.sum() for lp in learner.compute_logprobs(seqs)))


def train_for_check(learner, seqs: list, start: int, stop: int, save_at: int = 0, save=None) -> dict:
    """NLL steps start+1 .. stop on `seqs` -> result fields: losses and grad_norms per step; with save_at, after
    that step save(step) (its returned dict, if any, is merged in) and eval_logprob_sum_at_save."""
    total = sum(len(s) - 1 for s in seqs)
    fields = [{} for _ in seqs]
    out: dict = {"losses": [], "grad_norms": []}
    for step in range(start, stop):
        metrics = learner.train_step(seqs, fields, nll_loss_fn(total))
        out["losses"].append(float(metrics["loss"]))
        out["grad_norms"].append(float(metrics["grad_norm"]))
        if save_at and step + 1 == save_at:
            out.update(save(step + 1) or {})
            out["eval_logprob_sum_at_save"] = logprob_sum(learner, seqs)
    return out


def resume_for_check(learner, path: str, seqs: list) -> tuple:
    """Load checkpoint `path` into `learner` (model, optimizer, scheduler) -> (step to continue from, result
    fields: the resumed step and the eval log-prob sum right after loading, to compare with the one at the save)."""
    from megatron_bppo.checkpointing import load_checkpoint

    state = load_checkpoint(path, learner.models, learner.optimizer, learner.scheduler)
    learner.step = state["step"]
    return state["step"], {"resumed_step": state["step"],
                           "eval_logprob_sum_after_load": logprob_sum(learner, seqs)}
