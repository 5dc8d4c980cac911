"""Inputs, a loss and a resume for learner checks (tests/workers/*, scripts/gpu_check_worker.py): fixed token sequences and a
token-mean negative log-likelihood, the same in every check so their numbers compare."""
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


def resume_for_check(learner, path: str, seqs: list) -> tuple:
    """Load checkpoint `path` into `learner` (model, optimizer, scheduler) -> (step to continue from, result
    fields: the resumed step and the eval log-prob sum right after loading, to compare with the one at the save)."""
    from megatron_bppo.checkpointing import load_checkpoint

    state = load_checkpoint(path, learner.models, learner.optimizer, learner.scheduler)
    learner.step = state["step"]
    return state["step"], {"resumed_step": state["step"],
                           "eval_logprob_sum_after_load": float(sum(lp.sum() for lp in learner.compute_logprobs(seqs)))}
