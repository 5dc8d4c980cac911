"""HF checkpoint directory <-> megatron-core GPTModel, through mbridge (pinned 0.15.1).

    hf dir --(HFBridge.build: mbridge name map, TP split, PP stage)--> [GPTModel chunk]
    [GPTModel chunk] --(HFBridge.export_hf_weights: TP all-gather, PP broadcast, HF names)--> (name, tensor)*

Supported: the dense Llama / Qwen2 / Qwen2.5 / Qwen3 family (HF model_type llama, qwen2, qwen3). Weights are
read with safetensors only; `trust_remote_code` stays off unless the config asks for it.

mbridge adaptations (instance-level configuration of the bridge object; nothing global is patched):
- mbridge 0.15.1 always builds the TransformerEngine layer spec (llm_bridge.py `_get_transformer_layer_spec`)
  and maps TE's fused-norm parameter names (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`).
  Without TE we use megatron-core's local spec and map its `input_layernorm` / `pre_mlp_layernorm` names.
- transformers 5 moved `rope_theta` into `config.rope_parameters`; mbridge reads `hf_config.rope_theta`.
- mbridge's Llama table maps a tied model's last-stage output layer (PP > 1) to lm_head.weight.
- mbridge's get_model calls `.cuda()` unless (use_torch_fsdp2 and use_cpu_initialization); on CPU we pass
  both (with wrap_with_ddp=False the fsdp2 flag has no other effect) and wrap Megatron DDP ourselves.
"""
from __future__ import annotations

import json
import os
import types
from typing import Iterator

import torch

from ..errors import ConfigError
from ..platform import current_platform, have_transformer_engine

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CPU_CONFIG = dict(
    use_cpu_initialization=True, sequence_parallel=False, masked_softmax_fusion=False,
    bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
    persist_layer_norm=False, gradient_accumulation_fusion=False, batch_p2p_comm=False,
)


def read_hf_config(hf_dir: str, trust_remote_code: bool = False, require_weights: bool = True,
                   label: str = ""):
    """Load and check an HF config; clear errors for a missing/unsupported checkpoint directory and for truncated
    or corrupt safetensors files (headers only: cheap, and before any process group starts).
    `label`: how messages name the directory (default "model.path=<dir>"; tools pass their flag, "--hf-dir <dir>")."""
    label = label or f"model.path={hf_dir!r}"
    if not os.path.isdir(hf_dir):
        raise ConfigError(f"{label} is not a directory: point it at a Hugging Face checkpoint")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ConfigError(f"{label} has no config.json: is it a Hugging Face checkpoint directory?")
    if require_weights and not any(f.endswith(".safetensors") for f in os.listdir(hf_dir)):
        raise ConfigError(f"{label} has no *.safetensors weights (only safetensors are loaded, never pickled "
                          ".bin files); convert it with `save_pretrained(safe_serialization=True)`")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ConfigError(f"{label}: transformers cannot read config.json ({e})") from e
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{label} is a {config.model_type!r} model; supported model types: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if not hasattr(config, "rope_theta"):
        config.rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    scaling = getattr(config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default", "linear"):
        raise ConfigError(f"{label}: rope scaling {scaling} is not supported by this bridge "
                          "(only none or linear)")
    if require_weights:
        check_safetensors(hf_dir, label)
    return config


_MAX_SAFETENSORS_HEADER = 100 << 20          # the safetensors library's own limit on the JSON header


def check_safetensors(hf_dir: str, label: str = ""):
    """Every *.safetensors file of hf_dir (and every shard its index names) is present and whole: the 8-byte
    header length, the JSON header and the tensor data the header describes add up to the file size exactly (what
    the safetensors library checks when it opens a file), then `safe_open` reads the header. Reads headers only.
    Raises ConfigError naming the file. Corruption inside the tensor bytes is not detectable this way."""
    from safetensors import safe_open

    label = label or f"model.path={hf_dir!r}"
    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = set(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{label}: {index} is unreadable or not a safetensors index ({e!r}): re-download "
                              "or re-convert the checkpoint") from None
        missing = sorted(shards - set(files))
        if missing:
            raise ConfigError(f"{label}: {index} names weight shards that are missing: {', '.join(missing)}: "
                              "re-download or re-convert the checkpoint")
    for name in files:
        path = os.path.join(hf_dir, name)

        def bad(detail):
            return ConfigError(f"{label}: weights file {path} is truncated or corrupt ({detail}): re-download or "
                               "re-convert it")

        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_SAFETENSORS_HEADER):
                raise bad(f"its header length field says {n} bytes; the file has {size} bytes in all")
            try:
                header = json.loads(f.read(n))
                end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
                raise bad(f"unreadable header: {e!r}") from None
        if size != 8 + n + end:
            raise bad(f"the file has {size} bytes; its header describes {8 + n + end}")
        try:
            with safe_open(path, framework="pt") as f:
                f.keys()
        except Exception as e:                 # noqa: BLE001 -- the library's own verdict, reported as bad input
            raise bad(f"safetensors: {e}") from None


def model_dims(hf_config) -> dict:
    return dict(num_heads=hf_config.num_attention_heads,
                num_kv_heads=getattr(hf_config, "num_key_value_heads", hf_config.num_attention_heads),
                num_layers=hf_config.num_hidden_layers, vocab_size=hf_config.vocab_size)


def open_model(model, parallel, seed: int = 1234, require_weights: bool = True, hf_config=None):
    """The one start-up recipe from an HF directory and a layout (trainer, bench/, tools/ alike):
    read and check the HF config once -> check the layout against it -> process groups + Megatron parallel
    state -> the bridge. `model`: config.ModelConfig; `parallel`: config.ParallelConfig.
    `hf_config`: read_hf_config's result when the caller checked the directory first (it is read once).
    Returns (LaunchEnv, HFBridge); the caller builds model chunks with bridge.build() (or learner.build_learner)."""
    from ..distributed import init_distributed

    if hf_config is None:
        hf_config = read_hf_config(model.path, model.trust_remote_code, require_weights)
    launch, _ = init_distributed(parallel, model_dims(hf_config), seed=seed)
    return launch, HFBridge(model.path, model.dtype, model.spec, model.trust_remote_code, require_weights,
                            hf_config=hf_config)


class HFBridge:
    """One HF checkpoint family <-> Megatron GPTModel; call after parallel_state is initialised."""

    def __init__(self, hf_dir: str, dtype: str = "float32", spec: str = "auto", trust_remote_code: bool = False,
                 require_weights: bool = True, hf_config=None):
        """hf_config: the result of read_hf_config(hf_dir, ...) when the caller has it (read once per start)."""
        from mbridge import AutoBridge

        self.hf_dir = hf_dir
        self.hf_config = hf_config or read_hf_config(hf_dir, trust_remote_code, require_weights)
        self.dtype = _DTYPES[dtype]
        self.platform = current_platform()
        self.use_te = spec == "te" or (spec == "auto" and have_transformer_engine())
        if spec == "te" and not have_transformer_engine():
            raise ConfigError("model.spec=te but TransformerEngine is not importable on a CUDA machine: "
                              "install the gpu extra or use model.spec=local")
        self.bridge = AutoBridge.from_config(self.hf_config, dtype=self.dtype)
        if getattr(self.hf_config, "tie_word_embeddings", False):
            # With PP > 1 the last stage holds its own copy of the tied output layer; mbridge's Llama table maps
            # it to lm_head.weight, which a tied checkpoint does not have (Qwen2Bridge remaps it, Llama does not).
            self.bridge._DIRECT_MAPPING = {**self.bridge._DIRECT_MAPPING,
                                           "output_layer.weight": "model.embed_tokens.weight"}
        extra = dict(variable_seq_lengths=True, batch_p2p_comm=False)
        if not self.platform.is_cuda:
            extra.update(_CPU_CONFIG)
        if not self.use_te:
            extra["sequence_parallel"] = False      # torch norms have no sequence-parallel support
            self._use_local_spec()
        self.bridge.set_extra_args(**extra)
        self.config = self.bridge.config

    def _use_local_spec(self):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        bridge = self.bridge

        def local_spec(self_, vp_stage=None):
            self_.has_vp_stage = True
            return get_gpt_decoder_block_spec(self_.config, use_transformer_engine=False, vp_stage=vp_stage)

        bridge._get_transformer_layer_spec = types.MethodType(local_spec, bridge)
        bridge._OTHER_MAPPING = {**type(bridge)._OTHER_MAPPING,
                                 "input_layernorm.weight": ["model.layers.{layer_number}.input_layernorm.weight"]}
        bridge._MLP_MAPPING = {**type(bridge)._MLP_MAPPING, "pre_mlp_layernorm.weight":
                               ["model.layers.{layer_number}.post_attention_layernorm.weight"]}

    def build(self, load_weights: bool = True) -> list[torch.nn.Module]:
        """Megatron model chunks for this rank's pipeline stage (no DDP), weights from the HF dir."""
        on_cpu = not self.platform.is_cuda
        return self.bridge.get_model(
            weight_path=self.hf_dir if load_weights else None, wrap_with_ddp=False,
            bf16=self.dtype is torch.bfloat16, fp16=self.dtype is torch.float16,
            use_cpu_initialization=on_cpu, use_torch_fsdp2=on_cpu)

    @torch.no_grad()
    def export_hf_weights(self, models) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF-named tensors, TP-gathered and broadcast across PP; every rank receives every tensor.
        Tied embeddings are yielded once."""
        seen = set()
        for name, tensor in self.bridge.export_weights(models):
            if name in seen:
                continue
            seen.add(name)
            yield name, tensor

    def save_hf(self, models, out_dir: str, shard_bytes: int = 2 << 30, progress=None):
        """Write safetensors shards + index, config, generation config and tokenizer (rank 0 writes)."""
        save_hf_checkpoint(self.export_hf_weights(models), out_dir, self.hf_config, self.hf_dir,
                           shard_bytes=shard_bytes, progress=progress)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja", "added_tokens.json")


def copy_hf_side_files(src_dir: str, out_dir: str):
    """Tokenizer and generation config travel with the weights."""
    import shutil

    for name in TOKENIZER_FILES:
        path = os.path.join(src_dir, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(out_dir, name))


def save_hf_checkpoint(named_tensors, out_dir: str, hf_config, side_files_dir: str | None,
                       shard_bytes: int = 2 << 30, progress=None):
    """Stream (name, tensor) into HF safetensors shards on rank 0; other ranks only drive the collectives."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        os.makedirs(out_dir, exist_ok=True)
    shard, shard_size, shards, weight_map = {}, 0, [], {}

    def flush():
        nonlocal shard, shard_size
        if shard:
            fname = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
            shards.append(fname)
            weight_map.update({k: fname for k in shard})
            shard, shard_size = {}, 0

    for name, tensor in named_tensors:
        if not rank0:
            continue
        shard[name] = tensor.detach().to("cpu", copy=True).contiguous()
        shard_size += tensor.numel() * tensor.element_size()
        if progress:
            progress(name, tensor)
        if shard_size >= shard_bytes:
            flush()
    if not rank0:
        return
    flush()
    if len(shards) == 1:
        os.replace(os.path.join(out_dir, shards[0]), os.path.join(out_dir, "model.safetensors"))
    else:
        total = sum(os.path.getsize(os.path.join(out_dir, f)) for f in shards)
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_config.save_pretrained(out_dir)
    if side_files_dir:
        copy_hf_side_files(side_files_dir, out_dir)
