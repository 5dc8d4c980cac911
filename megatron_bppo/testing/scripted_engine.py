"""A deterministic rollout engine for scheduling tests: every sample's length and answer follow from its seed.

    SampleRequest(seed) --outcome(seed) -> (length, correct)--> Completion(length tokens, text "ok" / "bad")
    run_requests: all at once (BatchStream gives round barriers);  stream(): one token per running request per
    step, at most max_num_seqs running (first come, first served), so a stream finishes short samples first.

Rewards: megatron_bppo.testing.rewards.even_length scores "ok" correct and "bad" incorrect. No model is run: the
scheduling, early-stop and accounting logic of collect.py is what these tests exercise, with outcomes that can be
enumerated (the same logic runs on vLLM in tests/test_streaming.py).
"""
from __future__ import annotations

import hashlib
from typing import Callable, Optional

import torch

from megatron_bppo.rollout.engine import Completion, RolloutEngine, RolloutStream, StreamStep


def hashed_outcome(p_correct: Callable[[tuple], float], max_len: int = 40) -> Callable:
    """outcome(request) from a hash of its seed: correct with probability p_correct(prompt ids), length in
    [1, max_len]."""
    def outcome(request):
        h = hashlib.blake2b(str(request.seed).encode(), digest_size=8).digest()
        u, length = int.from_bytes(h[:4], "little") / 2 ** 32, 1 + int.from_bytes(h[4:], "little") % max_len
        return length, u < p_correct(request.prompt_token_ids)
    return outcome


class ScriptedEngine(RolloutEngine):
    def __init__(self, outcome: Callable, max_num_seqs: int = 64):
        self.outcome, self.max_num_seqs = outcome, max_num_seqs
        self.decode_steps = 0          # token steps run by streams (a round's cost is its longest sample)
        self._init_phase_state(weights_loaded=True)      # it has no memory to free: sleep(level) only flips state

    def _completion(self, request, tokens: Optional[int] = None, finish: Optional[str] = None) -> Completion:
        length, correct = self.outcome(request)
        n = length if tokens is None else tokens
        return Completion(prompt_index=0, token_ids=[7] * n, text="ok" if correct else "bad",
                          logprobs=torch.zeros(n), finish_reason=finish or "stop")

    def run_requests(self, requests, sampling):
        self.decode_steps += max((self.outcome(r)[0] for r in requests), default=0)
        return [self._completion(r) for r in requests]

    def stream(self, sampling, track_running: bool = False) -> RolloutStream:
        return _ScriptedStream(self, track_running)

    def score(self, sequences):
        raise NotImplementedError("ScriptedEngine only samples")

    def update_weights(self, named_tensors):
        raise NotImplementedError("ScriptedEngine only samples")


class _ScriptedStream(RolloutStream):
    def __init__(self, engine: ScriptedEngine, track_running: bool):
        self.engine, self.track_running = engine, track_running
        self.waiting: list = []
        self.running: dict = {}          # key -> [request, tokens so far]

    @property
    def outstanding(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, requests):
        self.waiting.extend(requests)

    def step(self) -> StreamStep:
        while self.waiting and len(self.running) < self.engine.max_num_seqs:
            r = self.waiting.pop(0)
            self.running[r.key] = [r, 0]
        self.engine.decode_steps += 1
        finished = []
        for key, entry in list(self.running.items()):
            entry[1] += 1
            if entry[1] >= self.engine.outcome(entry[0])[0]:
                finished.append((key, self.engine._completion(entry[0])))
                del self.running[key]
        running = {k: n for k, (_, n) in self.running.items()} if self.track_running else {}
        return StreamStep(finished, running)

    def stop(self, keys):
        out = {}
        for key in keys:
            request, tokens = self.running.pop(key)
            out[key] = self.engine._completion(request, tokens, "abort")
        return out
