"""Rollout: the engine interface (engine.py), its vLLM implementation (vllm_engine.py, imports vLLM lazily),
engine replicas over ranks (placement.py) and the train/rollout log-prob mismatch metric (consistency.py).
Their settings, RolloutConfig and SamplingConfig, live in megatron_bppo.config."""
from .consistency import check_mismatch, logprob_mismatch
from .engine import Completion, RolloutEngine, RolloutEngineError, WeightUpdateStats
from .vllm_engine import VLLMEngine

__all__ = ["Completion", "RolloutEngine", "RolloutEngineError", "WeightUpdateStats", "VLLMEngine",
           "check_mismatch", "logprob_mismatch"]
