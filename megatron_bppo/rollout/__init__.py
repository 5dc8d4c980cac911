"""Rollout: the engine interface (engine.py), its vLLM implementation (vllm_engine.py, imports vLLM lazily),
engine replicas over ranks (placement.py) and the train/rollout log-prob mismatch metric (consistency.py)."""
from .consistency import check_mismatch, logprob_mismatch, response_logprobs
from .engine import Completion, RolloutEngine, RolloutEngineError, SamplingConfig, WeightUpdateStats
from .vllm_engine import RolloutConfig, VLLMEngine

__all__ = ["Completion", "RolloutEngine", "RolloutEngineError", "SamplingConfig", "WeightUpdateStats",
           "RolloutConfig", "VLLMEngine", "check_mismatch", "logprob_mismatch", "response_logprobs"]
