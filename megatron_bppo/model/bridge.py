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

Vocabulary padding (as Megatron-LM does: megatron/training/tokenizer/tokenizer.py `_vocab_size_with_padding`,
multiple = make_vocab_size_divisible_by (default 128) * TP; megatron-core 0.16.1 ships no megatron/training, so the
rule lives in `padded_vocab_size` here). mbridge 0.15.1 does the rest when its constructor gets
`make_vocab_size_divisible_by` (= 128 * TP): GPTModel is built with the padded size (llm_bridge.py:179-187), the
HF embedding / lm_head get zero rows appended on load (core/bridge.py:776-791) and the padded rows are cut off again
on export (core/bridge.py:693-702). The padded rows are never sampled (the engine only ever receives the exported,
unpadded tensors), never scored (learner.token_logprobs masks their logits to -inf before the vocab-parallel
log-softmax, so they get exactly zero gradient and stay zero), and Megatron checkpoints stay layout-free: megatron-core
marks the embedding and output layer `allow_shape_mismatch` (tensor_parallel/layers.py:309-319,
language_module.py:302), so a checkpoint padded for one TP loads at another.

RoPE scaling: transformers 5 keeps it in `config.rope_parameters` (`rope_scaling` in config.json; transformers 4 kept
`config.rope_scaling`). mbridge's Llama bridge reads `"rope_scaling" in hf_config`, which is False under
transformers 5 (so scaling was silently dropped), and when it does fire it maps every type to linear position
interpolation (models/llama.py:80-88); Qwen bridges ignore it. Here: none/"default", "linear" and "llama3" are mapped
exactly (same inverse frequencies as transformers, `apply_rope_scaling`); anything else is a ConfigError.
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
    rope_scaling_of(config, label)
    check_architecture(config, label)
    if require_weights:
        check_safetensors(hf_dir, label)
    return config


# ------------------------------------------------------------------------------------- RoPE scaling
ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_ROPE_FIX = ("to train within the checkpoint's original context, delete the rope_scaling entry from config.json "
             "(transformers and vLLM then run unscaled too), or pick a checkpoint without it")


def rope_scaling_of(hf_config, label: str = "") -> dict | None:
    """The checkpoint's RoPE scaling, {"rope_type": "linear" | "llama3", <its parameters>}, or None when unscaled.
    Reads transformers 5's `rope_parameters` (config.json `rope_scaling` + `rope_theta`) or transformers 4's
    `rope_scaling`. ConfigError, naming the key and the fix, for anything `apply_rope_scaling` cannot reproduce."""
    label = label or "model.path"
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:
        params = getattr(hf_config, "rope_scaling", None)
    params = dict(params or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{label}: config.json has per-layer-type rope parameters ({sorted(params)}), which this "
                          "bridge does not map; supported model types: " + ", ".join(SUPPORTED_MODEL_TYPES))
    partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"{label}: config.json partial_rotary_factor={partial} is not supported by this bridge "
                          "(rotary embedding on the whole head only); use a checkpoint with full rotary dims")
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type == "default":
        return None
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{label}: config.json rope_scaling.rope_type={rope_type!r} is not supported by this "
                          f"bridge (supported: none, 'linear', 'llama3'): {_ROPE_FIX}")
    needed = ("factor",) if rope_type == "linear" else _LLAMA3_KEYS
    missing = [k for k in needed if params.get(k) is None]
    if missing:
        raise ConfigError(f"{label}: config.json rope_scaling (rope_type {rope_type!r}) lacks "
                          f"{', '.join(missing)}: add {'them' if len(missing) > 1 else 'it'} as in the original "
                          "model's config.json")
    if not float(params["factor"]) > 0:
        raise ConfigError(f"{label}: config.json rope_scaling.factor={params['factor']} must be > 0")
    if rope_type == "llama3" and not float(params["high_freq_factor"]) > float(params["low_freq_factor"]):
        raise ConfigError(f"{label}: config.json rope_scaling.high_freq_factor={params['high_freq_factor']} must "
                          f"exceed low_freq_factor={params['low_freq_factor']} (Llama 3.1 uses 4 and 1)")
    return {"rope_type": rope_type, **{k: int(params[k]) if k == "original_max_position_embeddings"
                                       else float(params[k]) for k in needed}}


def rope_gptmodel_args(rope: dict | None) -> dict:
    """GPTModel keyword arguments for a rope_scaling_of result. llama3 turns megatron-core's own Llama 3 scaling on
    (gpt_model.py:104-105 -> RotaryEmbedding rope_scaling / rope_scaling_factor, rotary_pos_embedding.py:83); megatron
    hard-codes low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192 there (the Llama 3.1
    values), so `apply_rope_scaling` re-derives the frequencies with the checkpoint's own values after the build.
    linear: no GPTModel argument (its seq_len_interpolation_factor scales positions, transformers scales
    frequencies: equal in exact arithmetic, not in float32); `apply_rope_scaling` divides the frequencies instead."""
    if rope and rope["rope_type"] == "llama3":
        return {"rope_scaling": True, "rope_scaling_factor": rope["factor"]}
    return {}


def apply_rope_scaling(rotary_pos_emb, rope: dict | None, rope_theta: float):
    """Set a megatron-core RotaryEmbedding's inverse frequencies to exactly transformers' for this scaling
    (modeling_rope_utils.py `_compute_linear_scaling_rope_parameters` / `_compute_llama3_parameters`): the unscaled
    frequencies computed as both libraries do, then `/ factor` (linear) or megatron-core's
    RotaryEmbedding._apply_scaling (rotary_pos_embedding.py:92-126, the same formula as transformers') called with
    all four Llama 3 parameters. Call before the first forward (RotaryEmbedding.forward is lru_cached)."""
    if not rope:
        return
    inv_freq = rotary_pos_emb.inv_freq
    dim = 2 * inv_freq.numel()
    base = 1.0 / (rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=inv_freq.device) / dim))
    if rope["rope_type"] == "linear":
        rotary_pos_emb.inv_freq = base / rope["factor"]
    else:
        rotary_pos_emb.inv_freq = rotary_pos_emb._apply_scaling(
            base, factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
            original_max_position_embeddings=rope["original_max_position_embeddings"])


def check_architecture(hf_config, label: str = ""):
    """Config keys that the mbridge mapping would silently get wrong: ConfigError naming the key and the fix."""
    label = label or "model.path"
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{label}: config.json hidden_act={act!r} is not supported (the bridge builds SwiGLU "
                          "MLPs); use a checkpoint with hidden_act 'silu'")
    if getattr(hf_config, "mlp_bias", False):
        raise ConfigError(f"{label}: config.json mlp_bias=true is not supported (mbridge maps no MLP biases); "
                          "use a checkpoint with mlp_bias false")
    if getattr(hf_config, "use_sliding_window", False):
        raise ConfigError(f"{label}: config.json use_sliding_window=true is not supported (Megatron runs full "
                          "attention here); set use_sliding_window to false in config.json if the model was trained "
                          "or is used within sliding_window tokens")


# ------------------------------------------------------------------------------------- vocabulary padding
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128          # Megatron-LM's --make-vocab-size-divisible-by default


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> int:
    """Megatron-LM's rule (megatron/training/tokenizer/tokenizer.py `_vocab_size_with_padding`): round up to a
    multiple of make_vocab_size_divisible_by * TP, so every TP shard of the embedding / output layer is a whole
    multiple of `divisible_by` rows. E.g. 32001 -> 32128 at TP1, 32256 at TP2; 509 -> 512 at TP1..4."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


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
    """What the layout check needs. No vocab_size: a vocabulary TP does not divide is padded (padded_vocab_size)."""
    return dict(num_heads=hf_config.num_attention_heads,
                num_kv_heads=getattr(hf_config, "num_key_value_heads", hf_config.num_attention_heads),
                num_layers=hf_config.num_hidden_layers)


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
        from megatron.core import parallel_state as ps
        from mbridge import AutoBridge

        self.hf_dir = hf_dir
        self.hf_config = hf_config or read_hf_config(hf_dir, trust_remote_code, require_weights)
        self.dtype = _DTYPES[dtype]
        self.platform = current_platform()
        self.use_te = spec == "te" or (spec == "auto" and have_transformer_engine())
        if spec == "te" and not have_transformer_engine():
            raise ConfigError("model.spec=te but TransformerEngine is not importable on a CUDA machine: "
                              "install the gpu extra or use model.spec=local")
        tp = ps.get_tensor_model_parallel_world_size()
        self.vocab_size = int(self.hf_config.vocab_size)
        self.padded_vocab_size = padded_vocab_size(self.vocab_size, tp)
        self.rope_scaling = rope_scaling_of(self.hf_config)
        # mbridge pads to a multiple of make_vocab_size_divisible_by alone; the TP factor makes it Megatron's rule
        self.bridge = AutoBridge.from_config(self.hf_config, dtype=self.dtype,
                                             make_vocab_size_divisible_by=MAKE_VOCAB_SIZE_DIVISIBLE_BY * tp)
        self._map_rope_scaling()
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

    def _map_rope_scaling(self):
        """GPTModel's rope arguments from rope_gptmodel_args, never mbridge's.

        WORKAROUND (mbridge 0.15.1, models/llama.py:80-88): its Llama bridge tests `"rope_scaling" in hf_config`
        (always False under transformers 5, so scaling was silently dropped) and, when it fires, passes every
        rope type as linear position interpolation (seq_len_interpolation_factor); Qwen bridges pass none. We wrap
        the bridge instance's private _get_gptmodel_args to drop that and add megatron-core's own arguments."""
        original = self.bridge._get_gptmodel_args
        extra = rope_gptmodel_args(self.rope_scaling)

        def gptmodel_args():
            args = original()
            args.pop("seq_len_interpolation_factor", None)
            args.update(extra)
            return args

        self.bridge._get_gptmodel_args = gptmodel_args

    def _on_model_created(self, model, **_):
        """mbridge post-creation callback, once per model chunk, before weights load and before any forward."""
        if model.vocab_size != self.padded_vocab_size:
            raise RuntimeError(f"mbridge built a vocabulary of {model.vocab_size} rows; expected "
                               f"{self.padded_vocab_size} ({self.vocab_size} padded for TP)")
        model.hf_vocab_size = self.vocab_size        # what the learner masks the padded logit columns with
        rotary = getattr(model, "rotary_pos_emb", None)
        if rotary is not None:
            apply_rope_scaling(rotary, self.rope_scaling, float(self.hf_config.rope_theta))
        elif self.rope_scaling:
            raise RuntimeError("rope scaling is set but the model has no rotary embedding to scale")

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
        models = self.bridge.get_model(
            weight_path=self.hf_dir if load_weights else None, wrap_with_ddp=False,
            bf16=self.dtype is torch.bfloat16, fp16=self.dtype is torch.float16,
            use_cpu_initialization=on_cpu, use_torch_fsdp2=on_cpu,
            post_model_creation_callbacks=[self._on_model_created])
        if (self.bridge.vocab_size, self.bridge.padded_vocab_size) != (self.vocab_size, self.padded_vocab_size):
            raise RuntimeError(f"mbridge pads the vocabulary {self.bridge.vocab_size} -> "
                               f"{self.bridge.padded_vocab_size}; expected {self.vocab_size} -> "
                               f"{self.padded_vocab_size}")
        return models

    @torch.no_grad()
    def export_hf_weights(self, models) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF-named tensors, TP-gathered and broadcast across PP; every rank receives every tensor.
        Tied embeddings are yielded once. Vocabulary tensors come out unpadded (mbridge cuts the padded rows,
        core/bridge.py:693-702); a tensor with another row count is an error, never passed on."""
        seen = set()
        for name, tensor in self.bridge.export_weights(models):
            if name in seen:
                continue
            seen.add(name)
            if name in VOCAB_TENSORS and tensor.shape[0] != self.vocab_size:
                raise RuntimeError(f"export of {name}: {tensor.shape[0]} rows, expected the checkpoint's "
                                   f"vocab_size {self.vocab_size} (padded rows must never leave the learner)")
            yield name, tensor

    def save_hf(self, models, out_dir: str, shard_bytes: int = 2 << 30, progress=None):
        """Write safetensors shards + index, config, generation config and tokenizer (rank 0 writes)."""
        save_hf_checkpoint(self.export_hf_weights(models), out_dir, self.hf_config, self.hf_dir,
                           shard_bytes=shard_bytes, progress=progress)


VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
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
