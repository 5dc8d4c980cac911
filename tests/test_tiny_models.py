"""Quick tests of the tiny tokenizer/checkpoint builders (megatron_bppo.testing.tiny_models). CPU, offline, ~15 s."""
from __future__ import annotations

import json
import os
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from megatron_bppo.model.cache import MARKER_NAME  # noqa: E402
from megatron_bppo.testing.tiny_models import (  # noqa: E402
    make_tiny_checkpoint,
    tiny_checkpoint_cache,
    train_tiny_tokenizer,
)

TEXTS = [
    "Tom has 12 apples. He buys 30 more. How many apples does he have? The answer is \\boxed{42}.",
    "  leading spaces, tabs\tand\nnewlines  ",
    "héllo wörld, 世界 🙂 — non-ASCII bytes",
    "",
]


def _tensor_names(path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="module")
def ckpts(root):
    return {
        ("llama", False): tiny_checkpoint_cache(root, arch="llama", tie_word_embeddings=False),
        ("llama", True): tiny_checkpoint_cache(root, arch="llama", tie_word_embeddings=True),
        ("qwen2", False): tiny_checkpoint_cache(root, arch="qwen2", tie_word_embeddings=False),
        ("qwen2", True): tiny_checkpoint_cache(root, arch="qwen2", tie_word_embeddings=True),
    }


def test_tokenizer_roundtrip_and_chat_template(tmp_path):
    train_tiny_tokenizer(tmp_path / "tok", vocab_size=512)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(tok) == 512
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=True)
        assert all(0 <= i < 512 for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode("123") == [tok.convert_tokens_to_ids(c) for c in "123"]  # one token per digit
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1  # special tokens are atomic

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids == tok.encode(text) and ids.count(1) == 3 and ids.count(2) == 2
    assert tok.decode(ids) == text


def test_tokenizer_is_deterministic():
    a, b = train_tiny_tokenizer(None), train_tiny_tokenizer(None)
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_tensor_names(ckpts, arch, tied):
    path = ckpts[(arch, tied)]
    names = _tensor_names(path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tied and cfg["model_type"] == arch
    assert (cfg["vocab_size"], cfg["head_dim"], cfg["num_key_value_heads"]) == (512, 32, 2)
    per_layer = {"input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                 "mlp.up_proj.weight", "mlp.down_proj.weight"}
    per_layer |= {f"self_attn.{p}_proj.weight" for p in "qkvo"}
    if arch == "qwen2":
        per_layer |= {f"self_attn.{p}_proj.bias" for p in "qkv"}
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    expected |= {f"model.layers.{i}.{n}" for i in range(2) for n in per_layer}
    if not tied:
        expected.add("lm_head.weight")
    assert names == expected
    assert not list(path.glob("*.bin"))
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", MARKER_NAME):
        assert (path / f).is_file(), f
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True)])
def test_reload_gives_identical_logits(ckpts, tmp_path, arch, tied):
    path = ckpts[(arch, tied)]
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True).eval()
    assert model.config.tie_word_embeddings is tied
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied
    # every parameter was re-drawn: no default-initialised norms (all ones) or biases (all zeros)
    for name, p in model.named_parameters():
        assert p.std().item() > 1e-3, name
        assert not torch.all(p == 1.0) and not torch.all(p == 0.0), name
    ids = torch.tensor([tok.encode(TEXTS[0])])
    with torch.no_grad():
        logits = model(ids).logits
        model.save_pretrained(str(tmp_path / "resaved"))
        again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "resaved"), dtype=torch.float32).eval()
        assert torch.equal(again(ids).logits, logits)
        out = model.generate(ids[:, :8], attention_mask=torch.ones_like(ids[:, :8]), max_new_tokens=4,
                             do_sample=False)
    assert logits.shape == (1, ids.shape[1], 512) and torch.isfinite(logits).all()
    assert logits.std().item() > 0.1  # not degenerate
    assert out.shape == (1, 12)


def test_same_args_same_bytes(ckpts, tmp_path):
    # a second build with the same arguments in another directory is bit-identical
    other = make_tiny_checkpoint(tmp_path / "again", arch="qwen2", tie_word_embeddings=True)
    a = (ckpts[("qwen2", True)] / "model.safetensors").read_bytes()
    assert (other / "model.safetensors").read_bytes() == a
    seed1 = make_tiny_checkpoint(tmp_path / "seed1", arch="qwen2", tie_word_embeddings=True, seed=1)
    assert (seed1 / "model.safetensors").read_bytes() != a


def test_cache_returns_same_dir_without_rebuilding(root, ckpts, tmp_path):
    path = ckpts[("llama", False)]
    st = (path / "model.safetensors").stat()
    marker = (path / MARKER_NAME).read_text()
    t0 = time.perf_counter()
    again = tiny_checkpoint_cache(root, arch="llama", tie_word_embeddings=False)
    assert time.perf_counter() - t0 < 0.5
    assert again == path
    assert (path / "model.safetensors").stat().st_mtime_ns == st.st_mtime_ns
    assert (path / MARKER_NAME).read_text() == marker
    # explicit defaults hash the same; other arguments get another directory
    assert tiny_checkpoint_cache(root, arch="llama", tie_word_embeddings=False, hidden=128, seed=0) == path
    assert tiny_checkpoint_cache(root, arch="llama", tie_word_embeddings=False, seed=3) != path
    # no leftovers from the atomic build
    assert not [p for p in os.listdir(root) if ".tmp-" in p or ".old-" in p]

    # make_tiny_checkpoint on a dir built with other arguments rebuilds it; a foreign non-empty dir is refused
    d = make_tiny_checkpoint(tmp_path / "d", layers=1)
    assert json.loads((d / "config.json").read_text())["num_hidden_layers"] == 1
    make_tiny_checkpoint(d, layers=2)
    assert json.loads((d / "config.json").read_text())["num_hidden_layers"] == 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        make_tiny_checkpoint(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
