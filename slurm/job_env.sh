# Sourced by slurm/convert.sbatch and slurm/eval.sbatch (after `cd $ROOT`): the rendezvous and device settings
# every srun-native launch needs (slurm/train.sbatch carries the same lines with its own comments).
#   MASTER_ADDR = first node of the allocation, MASTER_PORT = 20000 + job id % 10000 (both overridable);
#   MEGATRON_BPPO_CPU: 1 CPU (gloo), 0 GPU (nccl), unset: CPU when the first node has no nvidia-smi;
#   GPU mode exports the NCCL / CUDA defaults of train.sbatch; SRUN_ARGS: --kill-on-bad-exit, one log per rank
#   under $LOG_DIR, the allocation's --cpus-per-task, $SRUN_EXTRA_ARGS.
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
export MASTER_ADDR MASTER_PORT
if [[ -z ${MEGATRON_BPPO_CPU:-} ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then MEGATRON_BPPO_CPU=0; else MEGATRON_BPPO_CPU=1; fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [[ $MEGATRON_BPPO_CPU != 1 ]]; then
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  [[ -n ${NCCL_SOCKET_IFNAME:-} ]] && export NCCL_SOCKET_IFNAME   # gloo's interface: derived in distributed.py
  [[ -n ${NCCL_IB_HCA:-} ]] && export NCCL_IB_HCA
  [[ -n ${NCCL_IB_GID_INDEX:-} ]] && export NCCL_IB_GID_INDEX
fi
SRUN_ARGS=(--kill-on-bad-exit=1 --output="$LOG_DIR/rank%t.log")
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && SRUN_ARGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
# shellcheck disable=SC2206
[[ -n ${SRUN_EXTRA_ARGS:-} ]] && SRUN_ARGS+=($SRUN_EXTRA_ARGS)
true
