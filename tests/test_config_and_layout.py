"""Config loading/validation and the start-up checks on launch environment and parallel layout."""
import os

import pytest

from megatron_bppo.config import Config, ConfigError, ParallelConfig, load_config, parse_overrides
from megatron_bppo.distributed import check_layout, detect_launch, expand_nodelist
from megatron_bppo.model.bridge import read_hf_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_plus_dotted_overrides(tmp_path):
    path = write(tmp_path, "parallel:\n  tp: 2\noptim:\n  lr: 1.0e-5\n")
    cfg = load_config(path, ["parallel.pp=2", "optim.clip_grad=0.5", "optim.use_distributed_optimizer=false",
                             "parallel.dp=null"])
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp) == (2, 2, None)
    assert cfg.optim.lr == 1e-5 and cfg.optim.clip_grad == 0.5 and cfg.optim.use_distributed_optimizer is False
    assert isinstance(cfg, Config) and cfg.to_dict()["parallel"]["tp"] == 2


@pytest.mark.parametrize("overrides,message", [
    (["parallel.tpp=2"], r"unknown config key 'parallel.tpp' \(did you mean 'tp'\?\)"),
    (["nosection.x=1"], "unknown config key 'nosection'"),
    (["parallel.tp=two"], "parallel.tp='two': expected int"),
    (["parallel.tp=1.5"], "parallel.tp='1.5': expected an integer"),
    (["parallel.tp=0"], r"parallel.tp=0: must be >= 1"),
    (["optim.lr=-1"], "optim.lr=-1.0: must be > 0"),
    (["optim.decay_style=cosine"], "optim.decay_style=cosine needs optim.decay_steps"),
    (["optim.use_distributed_optimizer=maybe"], "expected true or false"),
    (["model.dtype=fp8"], "model.dtype='fp8': must be one of float32, bfloat16, float16"),
    (["parallel.backend=mpi"], "parallel.backend='mpi': must be one of"),
    (["learner.micro_batch_tokens=10", "learner.max_seq_len=20"], "raise micro_batch_tokens"),
    (["model.path=/nonexistent/dir"], "model.path='/nonexistent/dir' is not a directory"),
    (["parallel"], "expected key=value"),
    (["parallel.tp.x=1"], "parallel.tp is a value, not a section"),
    (["sampling.temperature=0"], "training needs a sampling temperature > 0"),
])
def test_bad_config_names_key_and_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# One case per range / relation rule: the message names the dotted key, the value and the valid range (substring).
@pytest.mark.parametrize("overrides,message", [
    (["parallel.timeout_s=0"], "parallel.timeout_s=0: must be > 0"),
    (["optim.lr=nan"], "optim.lr=nan: must be > 0"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1: must be >= 0"),
    (["optim.adam_beta1=1"], "optim.adam_beta1=1.0: must be in [0, 1)"),
    (["optim.adam_beta2=-0.5"], "optim.adam_beta2=-0.5: must be in [0, 1)"),
    (["optim.adam_eps=0"], "optim.adam_eps=0.0: must be > 0"),
    (["optim.clip_grad=nan"], "optim.clip_grad=nan: must be >= 0"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps=-1: must be >= 0"),
    (["optim.decay_steps=0"], "optim.decay_steps=0: must be >= 1"),
    (["optim.decay_style=cosine", "optim.decay_steps=10", "optim.warmup_steps=10"],
     "optim.decay_steps=10: must be > optim.warmup_steps=10"),
    (["learner.max_seq_len=1"], "learner.max_seq_len=1: must be >= 2"),
    (["learner.micro_batch_tokens=0"], "learner.micro_batch_tokens=0: must be >= 1"),
    (["algorithm.epochs=0"], "algorithm.epochs=0: must be >= 1"),
    (["algorithm.mini_batches=0"], "algorithm.mini_batches=0: must be >= 1"),
    (["algorithm.adv_eps=-1e-6"], "algorithm.adv_eps=-1e-06: must be >= 0"),
    (["algorithm.clip_low=-0.2"], "algorithm.clip_low=-0.2: must be in [0, 1)"),
    (["algorithm.clip_low=1"], "algorithm.clip_low=1.0: must be in [0, 1)"),
    (["algorithm.clip_high=-0.1"], "algorithm.clip_high=-0.1: must be >= 0"),
    (["algorithm.kl_coef=-0.1"], "algorithm.kl_coef=-0.1: must be >= 0"),
    (["algorithm.norm_constant=0"], "algorithm.norm_constant=0.0: must be > 0"),
    (["algorithm.aggregation=token-sum-norm"],
     "algorithm.aggregation=token-sum-norm needs algorithm.norm_constant > 0 (e.g. sampling.max_tokens), got null"),
    (["algorithm.rollout_is_cap=0.5"], "algorithm.rollout_is_cap=0.5: must be >= 1"),
    (["algorithm.n_step=0"], "algorithm.n_step=0: must be >= 1"),
    (["algorithm.skip_after=-1"], "algorithm.skip_after=-1: must be in [0, 4]"),
    (["algorithm.skip_after=5"], "algorithm.skip_after=5: must be in [0, 4]"),
    (["algorithm.skip_cooldown=0"], "algorithm.skip_cooldown=0: must be >= 1"),
    (["algorithm.target_pairs=0"], "algorithm.target_pairs=0: must be >= 1"),
    (["algorithm.max_prompt_draw_factor=0.5"], "algorithm.max_prompt_draw_factor=0.5: must be >= 1"),
    (["algorithm.retry_prob=1.5"], "algorithm.retry_prob=1.5: must be in [0, 1]"),
    (["algorithm.min_mixed_rate=0"], "algorithm.min_mixed_rate=0.0: must be in (0, 1]"),
    (["rollout.seed=-1"], "rollout.seed=-1: must be in [0, 2**32 - 1]"),
    (["rollout.seed=4294967296"], "rollout.seed=4294967296: must be in [0, 2**32 - 1]"),
    (["data.train="], "data.train is empty"),
    (["data.train_size=0"], "data.train_size=0: must be >= 1"),
    (["data.eval_size=0"], "data.eval_size=0: must be >= 1"),
    (["data.prompts_per_step=16", "data.train_size=8"], "data.prompts_per_step=16 > data.train_size=8"),
    (["algorithm.target_pairs=8", "data.prompts_per_step=16", "data.train_size=20"],
     "data.train_size=20 < 32, the most distinct prompts a step may draw with algorithm.target_pairs=8"),
    (["eval.interval=-1"], "eval.interval=-1: must be >= 0"),
    (["eval.samples=-1"], "eval.samples=-1: must be >= 0"),
    (["train.steps=-5"], "train.steps=-5: must be >= 0"),
    (["algorithm.name=grpo", "algorithm.prefix=pair"],
     "algorithm.prefix=pair cuts both members of the selected pair to a length taken from the pair, but "
     "algorithm.selector resolves to 'all' (algorithm.name=grpo), which does not select exactly one correct and one "
     "incorrect completion per mixed group: use a pair selector"),
    (["algorithm.selector=max_variance_pairs", "algorithm.prefix=to_correct"],
     "algorithm.prefix=to_correct cuts both members"),
    (["algorithm.prefix=pair", "algorithm.prefix_schedule=[[0,0.5]]"],
     "algorithm.prefix_schedule is meaningless with algorithm.prefix=pair"),
])
def test_out_of_range_values_name_key_value_and_range(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


@pytest.mark.parametrize("overrides", [
    ["train.steps=0", "eval.interval=0", "eval.samples=0"],
    ["algorithm.clip_low=0", "algorithm.clip_high=0", "algorithm.kl_coef=0", "algorithm.adv_eps=0"],
    ["algorithm.rollout_is=truncated", "algorithm.rollout_is_cap=1"],
    ["algorithm.aggregation=token-sum-norm", "algorithm.norm_constant=256"],
    ["algorithm.skip_after=0"], ["algorithm.skip_after=4", "algorithm.skip_cooldown=1"],
    ["algorithm.retry_prob=0", "algorithm.min_mixed_rate=1"], ["algorithm.retry_prob=1"],
    ["optim.adam_beta1=0", "optim.adam_beta2=0", "optim.weight_decay=0", "optim.clip_grad=0"],
    ["optim.decay_style=linear", "optim.warmup_steps=10", "optim.decay_steps=11"],
    ["optim.decay_steps=5"],                                   # constant LR: decay_steps unused but in range
    ["rollout.seed=0"], ["rollout.seed=4294967295"],
    ["data.train_size=16", "data.prompts_per_step=16", "learner.max_seq_len=2", "learner.micro_batch_tokens=2"],
    ["algorithm.target_pairs=8", "data.prompts_per_step=16", "data.train_size=32"],
    ["algorithm.name=grpo", "algorithm.target_pairs=8", "data.prompts_per_step=16", "data.train_size=16"],
])
def test_edge_values_in_range_load(overrides):
    load_config(None, overrides)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "parallel: [\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="parallel: expected a mapping"):
        load_config(write(tmp_path, "parallel: 3\n"))


def test_parse_overrides_nests():
    assert parse_overrides(["a.b=1", "a.c=x=y", "d=2"]) == {"a": {"b": "1", "c": "x=y"}, "d": "2"}


@pytest.mark.parametrize("nodelist,hosts", [
    ("node1", ["node1"]),
    ("node[1-3]", ["node1", "node2", "node3"]),
    ("gpu[01-03,7],cpu1", ["gpu01", "gpu02", "gpu03", "gpu7", "cpu1"]),
    ("a[008-010]", ["a008", "a009", "a010"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_launch_from_torchrun_and_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"}
    assert detect_launch(env).__dict__ == dict(rank=3, world_size=4, local_rank=1, master_addr="h0",
                                               master_port=1234, source="torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
             "SLURM_JOB_NODELIST": "gpu[07-10]"}
    launch = detect_launch(slurm)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.master_port,
            launch.source) == (5, 8, 1, "gpu07", 24242, "slurm")
    assert detect_launch({}).world_size == 1
    with pytest.raises(RuntimeError, match="export MASTER_ADDR"):
        detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


@pytest.mark.parametrize("world,par,dims,message", [
    (3, ParallelConfig(tp=2), {}, "world size 3 is not divisible by parallel.tp"),
    (4, ParallelConfig(tp=2, dp=1), {}, r"parallel.dp=1 but world size 4 / \(tp 2 \* pp 1\) = 2"),
    (2, ParallelConfig(tp=2), dict(num_heads=3), "does not divide the model's 3 attention heads"),
    (4, ParallelConfig(tp=4), dict(num_heads=8, num_kv_heads=2), "does not divide the model's 2 key/value heads"),
    (2, ParallelConfig(pp=2), dict(num_layers=3), "does not divide the model's 3 layers"),
    (2, ParallelConfig(tp=2), dict(vocab_size=501), "does not divide the vocabulary size 501"),
])
def test_bad_layouts(world, par, dims, message):
    with pytest.raises(ConfigError, match=message):
        check_layout(world, par, **dims)


def test_good_layout_returns_dp():
    assert check_layout(8, ParallelConfig(tp=2, pp=2), num_heads=4, num_kv_heads=2, num_layers=2) == 2


def test_bad_model_dirs(tmp_path, tiny_qwen2):
    with pytest.raises(ConfigError, match="is not a directory"):
        read_hf_config(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="has no config.json"):
        read_hf_config(str(tmp_path))
    (tmp_path / "config.json").write_text(open(os.path.join(tiny_qwen2, "config.json")).read())
    with pytest.raises(ConfigError, match="no \\*.safetensors weights"):
        read_hf_config(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ConfigError, match="'gpt2' model; supported model types: llama, qwen2, qwen3"):
        read_hf_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read config.json"):
        read_hf_config(str(tmp_path))


def test_example_configs_are_valid():
    """Every shipped config loads and validates (model.path is left to the user)."""
    import glob

    paths = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                          "examples", "configs", "*.yaml")))
    assert len(paths) >= 8
    names = set()
    for path in paths:
        cfg = load_config(path)
        names.add((cfg.algorithm.name, os.path.basename(path).split("_")[0]))
    assert {("grpo", "gsm8k"), ("bppo", "gsm8k"), ("grpo", "math"), ("bppo", "math")} <= names
