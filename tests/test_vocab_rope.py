"""Checkpoints people train, at the TP they need (issue 14, item 5): a vocabulary TP does not divide is padded as
Megatron pads it, and Llama 3.x rope scaling is mapped exactly.

Multi-process (tests/workers/learner_worker.py, torchrun over gloo): HF log-prob parity, bit-exact export with no
padded row, padded rows untouched by training, at TP2 and PP2 for both tiny kinds; vLLM synced from the learner;
the conversion tool across a change of padding (TP1 -> TP2). In-process: the padding rule, the masked vocab-parallel
log-softmax, rotary frequencies against transformers', and the errors for what stays unsupported.
"""
import json
import os
import types

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_json, run_procs
from megatron_bppo.errors import ConfigError
from megatron_bppo.model.bridge import padded_vocab_size, read_hf_config, rope_scaling_of
from megatron_bppo.testing.tiny_models import TINY_LLAMA3_ROPE, TINY_PADDED_VOCAB, make_tiny_checkpoint

WORKER = "tests/workers/learner_worker.py"
TOOL = "tools/convert_checkpoint.py"
PARITY_TOL = 1e-4           # tests/test_learner_parity.py's HF log-prob tolerance
ENGINE_TOL = 1e-3           # tests/test_rollout.py's engine-vs-learner tolerance
# name -> (model fixture, tp, pp, extra worker flags)
RUNS = {"padded-tp2": ("tiny_padded_vocab", 2, 1, []), "padded-pp2": ("tiny_padded_vocab", 1, 2, []),
        "rope-tp2": ("tiny_llama3_rope", 2, 1, []), "rope-pp2": ("tiny_llama3_rope", 1, 2, ["--engine"])}


@pytest.fixture(scope="session")
def tiny_padded_vocab(models_dir):
    return str(make_tiny_checkpoint(models_dir / "llama-vocab509", **TINY_PADDED_VOCAB))


@pytest.fixture(scope="session")
def tiny_llama3_rope(models_dir):
    return str(make_tiny_checkpoint(models_dir / "llama3-rope-tied", **TINY_LLAMA3_ROPE))


def hf_tensors(path):
    return {k: v for f in sorted(os.listdir(path)) if f.endswith(".safetensors")
            for k, v in load_file(os.path.join(path, f)).items()}


# ---------------------------------------------------------------- multi-process
@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    work = tmp_path_factory.mktemp("vocab-rope")
    out = {}
    for name, (model, tp, pp, extra) in RUNS.items():
        path = str(work / f"{name}.json")
        run_procs([WORKER, "--hf", request.getfixturevalue(model), "--tp", str(tp), "--pp", str(pp), "--out", path,
                   *extra], nproc=tp * pp, timeout=400)
        out[name] = read_json(path)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_loads_matches_hf_and_exports_unpadded(runs, name):
    r = runs[name]
    assert r["logprob_maxdiff_vs_hf"] < PARITY_TOL, r
    assert r["export_names_equal"] and r["export_shapes_equal"], r
    assert r["export_maxdiff"] == 0.0, r
    tp = RUNS[name][1]
    vocab = r["padded_vocab"]["vocab_size"]
    assert r["padded_vocab"]["padded_vocab_size"] == padded_vocab_size(vocab, tp) > vocab, r


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_training_never_touches_padded_rows(runs, name):
    r = runs[name]
    losses = r["losses"]
    assert losses[0] > losses[1] > losses[2], losses
    assert r["padded_vocab"]["padded_rows_maxabs"] == 0.0, r


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["padded", "rope"])
def test_tp2_and_pp2_train_alike(runs, kind):
    """TP2 pads 509 -> 512 / 600 -> 768, PP2 (TP1) 509 -> 512 / 600 -> 640: the same training all the same."""
    a, b = runs[f"{kind}-tp2"], runs[f"{kind}-pp2"]
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5, abs=1e-6)
    assert a["grad_norms"] == pytest.approx(b["grad_norms"], rel=1e-4)


@pytest.mark.slow
def test_engine_synced_from_padded_learner_matches(runs):
    """vLLM (unpadded HF config, llama3 rope of its own) gets the trained weights by the sync: log-probs agree."""
    assert runs["rope-pp2"]["engine_maxdiff"] < ENGINE_TOL, runs["rope-pp2"]


@pytest.mark.slow
def test_conversion_across_a_change_of_padding_is_bit_exact(tiny_llama3_rope, tmp_path):
    """HF -> Megatron at TP1 (600 padded to 640) -> HF at TP2 (padded to 768): megatron-core loads the embedding
    with allow_shape_mismatch; the result equals the source bit for bit and has no padded row."""
    mcore, out = str(tmp_path / "mcore"), str(tmp_path / "hf")
    run_procs([TOOL, "hf-to-mcore", "--hf-dir", tiny_llama3_rope, "--out-dir", mcore, "--tp", "1"])
    run_procs([TOOL, "mcore-to-hf", "--ckpt-dir", mcore, "--out-dir", out, "--tp", "2"], nproc=2)
    original, converted = hf_tensors(tiny_llama3_rope), hf_tensors(out)
    assert sorted(original) == sorted(converted)
    for name in original:
        assert original[name].dtype == converted[name].dtype and torch.equal(original[name], converted[name]), name
    assert converted["model.embed_tokens.weight"].shape[0] == 600
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    scaling = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    assert cfg["vocab_size"] == 600 and scaling["rope_type"] == "llama3"


# ---------------------------------------------------------------- in-process
@pytest.mark.parametrize("vocab, tp, padded", [
    (509, 1, 512), (509, 2, 512), (509, 4, 512), (32001, 1, 32128), (32001, 2, 32256), (32001, 8, 32768),
    (600, 1, 640), (600, 2, 768), (512, 2, 512), (151936, 2, 152064), (128256, 8, 129024)])
def test_padding_rule_is_megatrons(vocab, tp, padded):
    assert padded_vocab_size(vocab, tp) == padded
    assert padded % (128 * tp) == 0 and padded - vocab < 128 * tp


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_masked_vocab_parallel_logsoftmax_over_real_columns(tp, monkeypatch):
    """Each TP shard masks its own padded columns; the log-softmax over the shards equals the one over the real
    columns, and padded columns get exactly zero gradient. (The shards are simulated; vocab_parallel_cross_entropy
    itself is exercised by the multi-process runs.)"""
    from megatron.core import parallel_state as ps

    from megatron_bppo.learner import mask_padded_vocab

    vocab = 509
    padded = padded_vocab_size(vocab, tp)
    logits = torch.randn(3, 5, padded, generator=torch.Generator().manual_seed(0), requires_grad=True)
    shards = []
    for rank, shard in enumerate(logits.chunk(tp, dim=-1)):
        monkeypatch.setattr(ps, "get_tensor_model_parallel_rank", lambda rank=rank: rank)
        shards.append(mask_padded_vocab(shard, vocab))
    masked = torch.cat(shards, dim=-1)
    assert torch.isinf(masked[..., vocab:]).all() and torch.isfinite(masked[..., :vocab]).all()
    ours = masked.log_softmax(-1)[..., :vocab]
    assert torch.allclose(ours, logits[..., :vocab].log_softmax(-1), atol=1e-6)
    ours.sum().backward()
    assert torch.count_nonzero(logits.grad[..., vocab:]) == 0
    assert mask_padded_vocab(logits, None) is logits


def _megatron_rotary(head_dim, theta, rope):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_bppo.model.bridge import apply_rope_scaling, rope_gptmodel_args

    rotary = RotaryEmbedding(kv_channels=head_dim, rotary_percent=1.0, rotary_base=theta,
                             use_cpu_initialization=True, **rope_gptmodel_args(rope))
    apply_rope_scaling(rotary, rope, theta)
    return rotary


LLAMA31_8B = dict(head_dim=128, theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                  "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
TINY = dict(head_dim=32, theta=10000.0, rope_scaling=TINY_LLAMA3_ROPE["rope_scaling"])
LINEAR = dict(head_dim=64, theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 4.0})


@pytest.mark.parametrize("case", ["llama31_8b", "tiny", "linear"])
def test_rotary_frequencies_equal_transformers(case):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    c = {"llama31_8b": LLAMA31_8B, "tiny": TINY, "linear": LINEAR}[case]
    hf_config = LlamaConfig(hidden_size=4 * c["head_dim"], num_attention_heads=4, head_dim=c["head_dim"],
                            rope_theta=c["theta"], rope_scaling=dict(c["rope_scaling"]), max_position_embeddings=1024)
    rope = rope_scaling_of(hf_config)
    assert rope["rope_type"] == c["rope_scaling"]["rope_type"]
    hf_inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config, "cpu")
    assert attention_factor == 1.0
    ours = _megatron_rotary(c["head_dim"], c["theta"], rope)
    assert torch.equal(ours.inv_freq, hf_inv_freq)
    unscaled = _megatron_rotary(c["head_dim"], c["theta"], None)
    assert not torch.equal(unscaled.inv_freq, hf_inv_freq)


def test_megatrons_own_llama3_defaults_only_fit_llama31():
    """megatron-core's rope_scaling=True hard-codes original_max_position_embeddings=8192 (and 1 / 4): exact for
    Llama-3.1, wrong for other values, hence apply_rope_scaling."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    for c, equal in ((LLAMA31_8B, True), (TINY, False)):
        own = RotaryEmbedding(kv_channels=c["head_dim"], rotary_percent=1.0, rotary_base=c["theta"],
                              rope_scaling=True, rope_scaling_factor=c["rope_scaling"]["factor"],
                              use_cpu_initialization=True)
        exact = _megatron_rotary(c["head_dim"], c["theta"], dict(c["rope_scaling"]))
        assert torch.equal(own.inv_freq, exact.inv_freq) == equal


def test_tiny_rope_checkpoint_is_released_style_and_scaling_matters(tiny_llama3_rope):
    """config.json as Llama-3.1's (rope_scaling + rope_theta); transformers reads it as llama3; and the scaling
    changes HF log-probs by far more than the parity tolerance (so the parity runs prove it is applied)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with open(os.path.join(tiny_llama3_rope, "config.json")) as f:
        raw = json.load(f)
    assert raw["rope_scaling"]["rope_type"] == "llama3" and "rope_parameters" not in raw
    assert read_hf_config(tiny_llama3_rope).vocab_size == 600
    scaled = AutoModelForCausalLM.from_pretrained(tiny_llama3_rope, dtype=torch.float32).eval()
    plain_cfg = AutoConfig.from_pretrained(tiny_llama3_rope)
    plain_cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama3_rope, config=plain_cfg, dtype=torch.float32).eval()
    ids = torch.randint(3, 600, (1, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        diff = (scaled(ids).logits.log_softmax(-1) - plain(ids).logits.log_softmax(-1)).abs().max().item()
    assert diff > 100 * PARITY_TOL, diff


def _cfg(**rope):
    return types.SimpleNamespace(rope_parameters=rope or None)


@pytest.mark.parametrize("rope, words", [
    (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768), ["rope_type='yarn'",
                                                                                   "delete the rope_scaling"]),
    (dict(rope_type="dynamic", factor=2.0), ["rope_type='dynamic'", "supported: none, 'linear', 'llama3'"]),
    (dict(rope_type="longrope", factor=2.0), ["rope_type='longrope'"]),
    (dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
     ["lacks original_max_position_embeddings"]),
    (dict(rope_type="linear"), ["lacks factor"]),
    (dict(rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0,
          original_max_position_embeddings=8192), ["high_freq_factor=1.0 must exceed low_freq_factor=4.0"]),
    (dict(rope_type="default", partial_rotary_factor=0.5), ["partial_rotary_factor=0.5"]),
])
def test_unsupported_rope_is_a_config_error(rope, words):
    with pytest.raises(ConfigError) as e:
        rope_scaling_of(_cfg(**rope), "model.path='m'")
    for word in words:
        assert word in str(e.value), str(e.value)


def test_supported_rope_forms():
    assert rope_scaling_of(_cfg()) is None
    assert rope_scaling_of(_cfg(rope_type="default", rope_theta=1e6)) is None
    assert rope_scaling_of(types.SimpleNamespace(rope_scaling={"type": "linear", "factor": 2})) == \
        {"rope_type": "linear", "factor": 2.0}                       # transformers 4 layout


@pytest.mark.parametrize("key, value, words", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
     "rope_scaling.rope_type='yarn'"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("mlp_bias", True, "mlp_bias=true"),
])
def test_read_hf_config_names_the_key(tiny_padded_vocab, tmp_path, key, value, words):
    with open(os.path.join(tiny_padded_vocab, "config.json")) as f:
        cfg = json.load(f)
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace("[", r"\[")):
        read_hf_config(str(tmp_path), require_weights=False)


def test_learner_finds_the_real_vocab_through_wrappers():
    """bf16/fp16 wrap each chunk in Float16Module and DDP wraps that (both `.module`, neither forwards attributes):
    the learner must still find the vocabulary model.bridge recorded on the GPTModel, or padding goes unmasked."""
    from megatron_bppo.learner import _real_vocab_size

    inner = torch.nn.Linear(2, 2)
    inner.hf_vocab_size = 509
    wrapped = torch.nn.Module()
    wrapped.module = torch.nn.Module()
    wrapped.module.module = inner
    assert _real_vocab_size(wrapped) == 509
    assert _real_vocab_size(torch.nn.Linear(2, 2)) is None
