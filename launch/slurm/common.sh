# shellcheck shell=bash
# Shared body of launch/slurm/*.sbatch (sourced, not run): read the knobs, check them before any job step
# starts, then one `srun` that starts one task per node -- inside the pyxis container, or on the host with
# CONTAINER_IMAGE=none -- and torchrun in that task.
#
# Knobs (environment variables; exported before `sbatch`, they reach the batch script) and defaults:
#   CONTAINER_IMAGE    required. pyxis image: a squashfs file (/shared/megaslim.sqsh) or a registry image
#                      (nvcr.io#nvidia/pytorch:25.04-py3, registry.example.com#team/megaslim:latest).
#                      `none`: no container; MEGASLIM_PYTHON runs torchrun on the host (venv / modules)
#   MEGASLIM_PYTHON    CONTAINER_IMAGE=none only. Python with megaslim's dependencies on every node, runs
#                      `-m torch.distributed.run`; default $MEGASLIM_DIR/.venv/bin/python, else python3
#   CONFIG             configs/smollm2.yaml. Config file as seen by the job; a relative path is relative to
#                      CONTAINER_WORKDIR (host mode: MEGASLIM_DIR)
#   OVERRIDES          "". Dotted overrides (key.sub=value), separated by whitespace; arguments given after
#                      the script name (sbatch prune.sbatch a.b=1 ...) are added after them, verbatim.
#                      A requeued run (SLURM_RESTART_COUNT > 0) gets resume=true appended
#   NPROC_PER_NODE     torchrun processes per node. Default: GPUS_PER_NODE (its older name) if set, else
#                      $SLURM_GPUS_ON_NODE (the GPUs sbatch --gpus-per-node / --gres=gpu:N allocated);
#                      with no GPU allocated: an error with a container, 1 on the host (a CPU node)
#   MASTER_PORT        29500. c10d rendezvous port on the first node of the allocation
#   MEGASLIM_DIR       the checkout holding this file (under sbatch: $SLURM_SUBMIT_DIR). Host directory
#                      with launch/ and configs/, mounted at the same path inside the container
#   CONTAINER_WORKDIR  $MEGASLIM_DIR. Working directory inside the container; /opt/megaslim runs the code
#                      baked into the docker/Dockerfile image instead of the checkout
#   CACHE_DIR          $HOME/.cache/megaslim-slurm. Host directory mounted at /cache (shared by all nodes:
#                      put it on a shared file system); inside, MEGASLIM_CACHE=/cache/megaslim and
#                      HF_HOME=/cache/huggingface
#   MOUNTS             "$MEGASLIM_DIR:$MEGASLIM_DIR,$CACHE_DIR:/cache". pyxis --container-mounts; set it
#                      empty for no mounts
#   EXTRA_MOUNTS       "". More SRC:DST[:FLAGS] mounts, comma-separated, appended to MOUNTS
#   SRUN_ARGS          "". Extra srun arguments (whitespace-separated), e.g. "--container-env=NCCL_DEBUG"
#   TORCHRUN_ARGS      "". Extra torchrun arguments (whitespace-separated), e.g. "--max-restarts=1"
# CONTAINER_WORKDIR, CACHE_DIR, MOUNTS and EXTRA_MOUNTS only apply to a container; host mode runs in
# MEGASLIM_DIR with the job's environment as it is.
# No knob or argument is ever evaluated by a shell: each reaches srun/torchrun as one argument.

megaslim_die() {
  echo "megaslim slurm: error: $*" >&2
  exit 1
}

# Print parallel.<key> from a YAML config's block-style `parallel:` section; "?" if the section is
# written in flow style (not parsed here), nothing if the key is absent (schema default: 1).
megaslim_yaml_parallel() {
  awk -v key="$2" '
    /^[^[:space:]#]/ {
      insec = ($0 ~ /^parallel:[[:space:]]*(#.*)?$/)
      if ($0 ~ /^parallel:[[:space:]]*[^[:space:]#]/) { print "?"; exit }
      next
    }
    insec && $0 ~ ("^[[:space:]]+" key "[[:space:]]*:") {
      sub(/#.*/, ""); sub(/^[^:]*:/, ""); gsub(/[[:space:]"\047]/, ""); print; exit
    }
  ' "$1"
}

# The knobs and their defaults, into the caller's (megaslim_launch's) variables.
megaslim_knobs() {
  local here
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  : "${CONFIG:=configs/smollm2.yaml}"
  : "${OVERRIDES:=}"
  : "${MASTER_PORT:=29500}"
  : "${MEGASLIM_DIR:=$here}"
  MEGASLIM_DIR=$(cd "$MEGASLIM_DIR" 2>/dev/null && pwd) || megaslim_die "MEGASLIM_DIR is not a directory"
  if [ "${CONTAINER_IMAGE:-}" = none ]; then
    host_mode=1
    workdir=$MEGASLIM_DIR
    if [ -z "${MEGASLIM_PYTHON:-}" ]; then
      MEGASLIM_PYTHON=python3
      [ -x "$MEGASLIM_DIR/.venv/bin/python" ] && MEGASLIM_PYTHON=$MEGASLIM_DIR/.venv/bin/python
    fi
  else
    : "${CONTAINER_WORKDIR:=$MEGASLIM_DIR}"
    workdir=$CONTAINER_WORKDIR
    : "${CACHE_DIR:=${HOME:-/tmp}/.cache/megaslim-slurm}"
    if [ -z "${MOUNTS+set}" ]; then
      MOUNTS="$MEGASLIM_DIR:$MEGASLIM_DIR,$CACHE_DIR:/cache"
      default_mounts=1
    fi
    if [ -n "${EXTRA_MOUNTS:-}" ]; then
      MOUNTS="${MOUNTS:+$MOUNTS,}$EXTRA_MOUNTS"
    fi
  fi
  # Processes per node: its own knob; GPUS_PER_NODE is its older name. Without either, the GPUs of the
  # allocation; none allocated is a CPU node on the host and a mistake in a (GPU) container.
  if [ -n "${NPROC_PER_NODE+set}" ]; then
    nproc=$NPROC_PER_NODE nproc_knob=NPROC_PER_NODE
  elif [ -n "${GPUS_PER_NODE+set}" ]; then
    nproc=$GPUS_PER_NODE nproc_knob=GPUS_PER_NODE
  elif [[ "${SLURM_GPUS_ON_NODE:-0}" =~ ^[1-9][0-9]*$ ]]; then
    nproc=$SLURM_GPUS_ON_NODE nproc_knob=SLURM_GPUS_ON_NODE
  elif [ "$host_mode" = 1 ]; then
    nproc=1 nproc_knob=NPROC_PER_NODE
  fi
  read -r -a overrides <<< "$OVERRIDES"
  overrides+=("$@")
  # Slurm requeued this job (preemption, node failure, scontrol requeue): continue the last checkpoint.
  if [[ "${SLURM_RESTART_COUNT:-0}" =~ ^[1-9][0-9]*$ ]]; then
    overrides+=(resume=true)
  fi
  read -r -a srun_args <<< "${SRUN_ARGS:-}"
  read -r -a torchrun_args <<< "${TORCHRUN_ARGS:-}"
}

# Everything that can be wrong before a job step starts.
megaslim_check() {
  if [ -z "${CONTAINER_IMAGE:-}" ]; then
    local hint=""
    [ -n "${MEGASLIM_PYTHON:-}" ] && hint=" (set CONTAINER_IMAGE=none to run MEGASLIM_PYTHON on the host)"
    megaslim_die "CONTAINER_IMAGE is not set$hint. Point it at the megaslim image (see docker/README.md), e.g.
  CONTAINER_IMAGE=/shared/megaslim.sqsh sbatch --nodes=2 --gpus-per-node=8 launch/slurm/$(basename "$launcher" .py).sbatch
or run without a container from a virtualenv: CONTAINER_IMAGE=none MEGASLIM_PYTHON=/path/to/venv/bin/python"
  fi
  if [ -z "${SLURM_JOB_ID:-}" ] || [ -z "${SLURM_JOB_NODELIST:-}" ] || [ -z "${SLURM_NNODES:-}" ]; then
    megaslim_die "not inside a Slurm allocation (SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_NNODES unset):" \
      "submit with sbatch"
  fi
  if [ -z "$nproc_knob" ]; then
    megaslim_die "no GPU in this allocation (SLURM_GPUS_ON_NODE unset or 0): submit with --gpus-per-node=N" \
      "(or --gres=gpu:N), or set NPROC_PER_NODE to the processes per node"
  fi
  local name value
  for name in "$nproc_knob" MASTER_PORT SLURM_NNODES; do
    value=${!name-}
    [ "$name" = "$nproc_knob" ] && value=$nproc
    [[ "$value" =~ ^[1-9][0-9]*$ ]] || megaslim_die "$name must be a positive integer, got '$value'"
  done
  [ -n "$CONFIG" ] || megaslim_die "CONFIG is empty"
  if [ "$host_mode" = 1 ]; then
    command -v "$MEGASLIM_PYTHON" > /dev/null ||
      megaslim_die "MEGASLIM_PYTHON '$MEGASLIM_PYTHON' is not an executable (point it at a venv's bin/python)"
  fi
  megaslim_check_files
  megaslim_check_layout
}

# The launcher and a relative config exist, when the job sees the checkout at its host path.
megaslim_check_files() {
  host_config=""
  if [ "$workdir" = "$MEGASLIM_DIR" ]; then
    [ -f "$MEGASLIM_DIR/$launcher" ] ||
      megaslim_die "$launcher not found in $MEGASLIM_DIR (set MEGASLIM_DIR to the megaslim checkout)"
    case $CONFIG in
      /*) host_config=$CONFIG ;;
      *) host_config=$MEGASLIM_DIR/$CONFIG
         [ -f "$host_config" ] || megaslim_die "config $CONFIG not found in $MEGASLIM_DIR" ;;
    esac
  elif [[ "$CONFIG" == /* ]]; then
    host_config=$CONFIG
  fi
}

# TP x PP must divide the processes of the allocation: overrides win over the config file (default 1).
megaslim_check_layout() {
  local tp="" pp="" arg
  if [ -n "$host_config" ] && [ -f "$host_config" ] && [ -r "$host_config" ]; then
    tp=$(megaslim_yaml_parallel "$host_config" tensor_model_parallel_size)
    pp=$(megaslim_yaml_parallel "$host_config" pipeline_model_parallel_size)
  fi
  for arg in ${overrides[@]+"${overrides[@]}"}; do
    case $arg in
      parallel.tensor_model_parallel_size=*) tp=${arg#*=} ;;
      parallel.pipeline_model_parallel_size=*) pp=${arg#*=} ;;
    esac
  done
  local world=$((SLURM_NNODES * nproc))
  if [[ "${tp:-1}" =~ ^[1-9][0-9]*$ ]] && [[ "${pp:-1}" =~ ^[1-9][0-9]*$ ]]; then
    if (( world % (${tp:-1} * ${pp:-1}) != 0 )); then
      megaslim_die "tensor_model_parallel_size=${tp:-1} x pipeline_model_parallel_size=${pp:-1} does not" \
        "divide the $world processes ($SLURM_NNODES node(s) x $nproc): change --nodes, NPROC_PER_NODE or the layout"
    fi
  fi
}

# megaslim_launch LAUNCHER [OVERRIDE...]: everything after the #SBATCH header of each script.
megaslim_launch() {
  local launcher=$1
  shift
  local host_mode=0 default_mounts=0 workdir="" nproc="" nproc_knob="" host_config=""
  local -a overrides=() srun_args=() torchrun_args=()
  megaslim_knobs "$@"
  megaslim_check

  # --- rendezvous on the first node ---------------------------------------------------------------
  local hosts
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST") ||
    megaslim_die "scontrol show hostnames '$SLURM_JOB_NODELIST' failed"
  MASTER_ADDR=${hosts%%$'\n'*}
  [ -n "$MASTER_ADDR" ] || megaslim_die "scontrol show hostnames '$SLURM_JOB_NODELIST' printed no host"
  export MASTER_ADDR MASTER_PORT

  local -a cmd=(srun --nodes "$SLURM_NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1)
  if [ "$host_mode" = 1 ]; then
    cmd+=(--chdir "$MEGASLIM_DIR" ${srun_args[@]+"${srun_args[@]}"} "$MEGASLIM_PYTHON" -m torch.distributed.run)
  else
    if [ "$default_mounts" = 1 ]; then
      mkdir -p "$CACHE_DIR" || megaslim_die "cannot create CACHE_DIR $CACHE_DIR"
    fi
    # Seen inside the container (srun passes the environment on): caches on the /cache mount, and no
    # ~/.local packages shadowing the image's.
    export MEGASLIM_CACHE=/cache/megaslim HF_HOME=/cache/huggingface PYTHONNOUSERSITE=1
    cmd+=(--container-image "$CONTAINER_IMAGE")
    if [ -n "$MOUNTS" ]; then
      cmd+=(--container-mounts "$MOUNTS")
    fi
    cmd+=(--container-workdir "$CONTAINER_WORKDIR" ${srun_args[@]+"${srun_args[@]}"} torchrun)
  fi
  cmd+=(--nnodes "$SLURM_NNODES" --nproc-per-node "$nproc"
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID"
    ${torchrun_args[@]+"${torchrun_args[@]}"}
    "$launcher" --config "$CONFIG" ${overrides[@]+"${overrides[@]}"})

  echo "megaslim slurm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}), $SLURM_NNODES node(s) x" \
    "$nproc process(es), $([ "$host_mode" = 1 ] && echo "host $MEGASLIM_PYTHON" || echo "container")," \
    "rendezvous $MASTER_ADDR:$MASTER_PORT"
  printf '%q ' "${cmd[@]}"
  echo
  exec "${cmd[@]}"
}
