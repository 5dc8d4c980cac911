"""Inputs and a loss for learner checks (tests/workers/*, scripts/gpu_check_worker.py): fixed token sequences and a
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
