"""Chunked log-probs (learner.logprob_chunk_tokens, issue 27) equal the whole-micro-batch logits path: eval
log-probs and the training gradient, at TP1, TP2 (plus the sequence-parallel gather on its own), PP2 with tied
weights, bf16, and SmolLM2. Real multi-process runs over gloo (tests/workers/logprob_chunk_worker.py)."""
import pytest

from conftest import read_json, run_procs

from megatron_bppo.config import LearnerConfig
from megatron_bppo.errors import ConfigError

WORKER = "tests/workers/logprob_chunk_worker.py"


def run_worker(tmp_path, hf, *args, nproc=2):
    out = str(tmp_path / "result.json")
    run_procs([WORKER, "--hf", hf, *args, "--out", out], nproc=nproc)
    return read_json(out)


def assert_fp32_equal(result, chunks=("1", "7", "1024")):
    """fp32: log-probs within 1e-6 relative to max(1, |log-prob|) (a few ulps), gradients within 1e-6 of the
    largest gradient. One token per chunk (1) multiplies a vector, not a matrix, so BLAS sums the hidden dimension
    in another order: its gradients get 1e-5."""
    for chunk in chunks:
        got = result["chunks"][chunk]
        assert got["logprob_maxdiff_rel"] < 1e-6, (chunk, got)
        assert got["grad_maxdiff_rel"] < (1e-5 if chunk == "1" else 1e-6), (chunk, got)


@pytest.mark.slow
def test_tp1_untied(tmp_path, tiny_qwen2):
    result = run_worker(tmp_path, tiny_qwen2, nproc=1)
    assert result["params"] == 17
    assert_fp32_equal(result)
    assert result["chunks"]["1024"]["logprob_maxdiff"] == 0.0        # one chunk: the output layer's own product


@pytest.mark.slow
def test_tp2_and_sequence_parallel_gather(tmp_path, tiny_qwen2):
    """TP2: the hidden states' gradient is all-reduced over the vocabulary shards (it was returned un-reduced
    when the copy into the TP region came before the transpose: megatron-core's _reduce all-reduces a contiguous
    copy of a non-contiguous gradient and returns the original). The sequence-parallel gather (GPU only in
    training: torch norms lack sequence parallelism) is checked on its own, values and both gradients."""
    result = run_worker(tmp_path, tiny_qwen2, "--tp", "2", "--sp-direct")
    assert result["layout"] == [2, 1, 2]
    assert_fp32_equal(result)
    for chunk, got in result["sp_direct"].items():
        assert got["padding_zero"], (chunk, got)
        assert got["logprob"] < 2e-6 and got["hidden_grad"] < 2e-6 and got["weight_grad"] < 2e-6, (chunk, got)


@pytest.mark.slow
def test_pp2_tied_embeddings(tmp_path, tiny_llama_tied):
    """The last stage's output weight is its own copy of the tied embedding (grads reduced across stages)."""
    result = run_worker(tmp_path, tiny_llama_tied, "--pp", "2")
    assert result["layout"] == [1, 2, 2]
    assert_fp32_equal(result)


@pytest.mark.slow
def test_tp2_bf16(tmp_path, tiny_llama_tied):
    """bf16: the same products, so equal log-probs; the weight gradient of each chunk is rounded to bf16 before
    the chunks are summed (the whole path rounds once), so several chunks differ by about bf16's precision."""
    result = run_worker(tmp_path, tiny_llama_tied, "--tp", "2", "--dtype", "bfloat16")
    for chunk, got in result["chunks"].items():
        assert got["logprob_maxdiff_rel"] < 1e-6, (chunk, got)
        assert got["grad_maxdiff_rel"] < (1e-5 if chunk == "1024" else 3e-2), (chunk, got)


@pytest.mark.slow
def test_smollm2_pp2(tmp_path):
    """The demo's model (49 k vocabulary, 9 heads: PP, not TP)."""
    from megatron_bppo.model.smollm2 import prepare_smollm2

    result = run_worker(tmp_path, str(prepare_smollm2()), "--pp", "2", "--chunks", "7,1024")
    assert_fp32_equal(result, chunks=("7", "1024"))


def test_features_that_need_the_output_layer():
    """The chunked path never calls GPTModel's output layer: features that hook into it are named (and Learner
    refuses them with a ConfigError pointing at learner.logprob_chunk_tokens=0)."""
    from types import SimpleNamespace

    from megatron_bppo.learner import chunking_conflicts

    assert chunking_conflicts(SimpleNamespace(defer_embedding_wgrad_compute=False, mtp_num_layers=None)) == []
    assert chunking_conflicts(SimpleNamespace(mtp_num_layers=1, use_mup=True)) == ["mtp_num_layers", "use_mup"]


def test_config_rejects_negative_chunk():
    with pytest.raises(ConfigError, match="learner.logprob_chunk_tokens=-1"):
        LearnerConfig(logprob_chunk_tokens=-1).validate()
    LearnerConfig(logprob_chunk_tokens=0).validate()
