"""Rollout: the engine interface (engine.py), its vLLM implementation (vllm_engine.py, imports vLLM lazily), a
transformers implementation (hf_engine.py, `rollout.backend=hf`: slow, exact, no vLLM), engine replicas over ranks
(placement.py) and the train/rollout log-prob mismatch metric (consistency.py). Their settings, RolloutConfig and
SamplingConfig, live in megatron_bppo.config; open_engine picks the backend."""
from .consistency import check_mismatch, logprob_mismatch
from .engine import Completion, RolloutEngine, RolloutEngineError, WeightUpdateStats
from .hf_engine import HFEngine
from .vllm_engine import VLLMEngine

ENGINES = {"vllm": VLLMEngine, "hf": HFEngine}


def open_engine(cfg_rollout, model_path: str, *, dtype: str = "float32", trust_remote_code: bool = False,
                hf_config=None) -> RolloutEngine:
    """The rollout engine rollout.backend names (vllm | hf), started on this rank (collective: every rank calls)."""
    cfg_rollout = cfg_rollout.validate()
    return ENGINES[cfg_rollout.backend](model_path, cfg_rollout, dtype=dtype, trust_remote_code=trust_remote_code,
                                        hf_config=hf_config)


__all__ = ["Completion", "RolloutEngine", "RolloutEngineError", "WeightUpdateStats", "VLLMEngine", "HFEngine",
           "open_engine", "check_mismatch", "logprob_mismatch"]
