# shellcheck shell=bash
# Shared body of launch/slurm/*.sbatch (sourced, not run): read the knobs, check them before any job step
# starts, then one `srun` that starts the pyxis container on every node and torchrun inside it.
#
# Knobs (environment variables; exported before `sbatch`, they reach the batch script) and defaults:
#   CONTAINER_IMAGE    required. pyxis image: a squashfs file (/shared/megaslim.sqsh) or a registry image
#                      (nvcr.io#nvidia/pytorch:25.04-py3, registry.example.com#team/megaslim:latest)
#   CONFIG             configs/smollm2.yaml. Config file as seen inside the container; a relative path is
#                      relative to CONTAINER_WORKDIR
#   OVERRIDES          "". Dotted overrides (key.sub=value), separated by whitespace; arguments given after
#                      the script name (sbatch prune.sbatch a.b=1 ...) are added after them, verbatim
#   GPUS_PER_NODE      $SLURM_GPUS_ON_NODE, else 8. torchrun processes per node
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

# megaslim_launch LAUNCHER [OVERRIDE...]: everything after the #SBATCH header of each script.
megaslim_launch() {
  local launcher=$1
  shift

  # --- knobs and their defaults --------------------------------------------------------------------
  local here
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  : "${CONFIG:=configs/smollm2.yaml}"
  : "${OVERRIDES:=}"
  : "${GPUS_PER_NODE:=${SLURM_GPUS_ON_NODE:-8}}"
  : "${MASTER_PORT:=29500}"
  : "${MEGASLIM_DIR:=$here}"
  MEGASLIM_DIR=$(cd "$MEGASLIM_DIR" 2>/dev/null && pwd) || megaslim_die "MEGASLIM_DIR is not a directory"
  : "${CONTAINER_WORKDIR:=$MEGASLIM_DIR}"
  : "${CACHE_DIR:=${HOME:-/tmp}/.cache/megaslim-slurm}"
  local default_mounts=0
  if [ -z "${MOUNTS+set}" ]; then
    MOUNTS="$MEGASLIM_DIR:$MEGASLIM_DIR,$CACHE_DIR:/cache"
    default_mounts=1
  fi
  if [ -n "${EXTRA_MOUNTS:-}" ]; then
    MOUNTS="${MOUNTS:+$MOUNTS,}$EXTRA_MOUNTS"
  fi
  local -a overrides=() srun_args=() torchrun_args=()
  read -r -a overrides <<< "$OVERRIDES"
  overrides+=("$@")
  read -r -a srun_args <<< "${SRUN_ARGS:-}"
  read -r -a torchrun_args <<< "${TORCHRUN_ARGS:-}"

  # --- checks, before any job step ------------------------------------------------------------------
  if [ -z "${CONTAINER_IMAGE:-}" ]; then
    megaslim_die "CONTAINER_IMAGE is not set. Point it at the megaslim image (see docker/README.md), e.g.
  CONTAINER_IMAGE=/shared/megaslim.sqsh sbatch --nodes=2 launch/slurm/$(basename "$launcher" .py).sbatch"
  fi
  if [ -z "${SLURM_JOB_ID:-}" ] || [ -z "${SLURM_JOB_NODELIST:-}" ] || [ -z "${SLURM_NNODES:-}" ]; then
    megaslim_die "not inside a Slurm allocation (SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_NNODES unset):" \
      "submit with sbatch"
  fi
  local name value
  for name in GPUS_PER_NODE MASTER_PORT SLURM_NNODES; do
    value=${!name}
    [[ "$value" =~ ^[1-9][0-9]*$ ]] || megaslim_die "$name must be a positive integer, got '$value'"
  done
  [ -n "$CONFIG" ] || megaslim_die "CONFIG is empty"

  # Files are checked on the host when the container sees the checkout at the same path.
  local host_config=""
  if [ "$CONTAINER_WORKDIR" = "$MEGASLIM_DIR" ]; then
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

  # TP x PP must divide the GPUs of the allocation: overrides win over the config file (default 1).
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
  local world=$((SLURM_NNODES * GPUS_PER_NODE))
  if [[ "${tp:-1}" =~ ^[1-9][0-9]*$ ]] && [[ "${pp:-1}" =~ ^[1-9][0-9]*$ ]]; then
    if (( world % (${tp:-1} * ${pp:-1}) != 0 )); then
      megaslim_die "tensor_model_parallel_size=${tp:-1} x pipeline_model_parallel_size=${pp:-1} does not" \
        "divide the $world GPUs ($SLURM_NNODES node(s) x $GPUS_PER_NODE): change --nodes, GPUS_PER_NODE or the layout"
    fi
  fi

  # --- rendezvous on the first node ---------------------------------------------------------------
  local hosts
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST") ||
    megaslim_die "scontrol show hostnames '$SLURM_JOB_NODELIST' failed"
  MASTER_ADDR=${hosts%%$'\n'*}
  [ -n "$MASTER_ADDR" ] || megaslim_die "scontrol show hostnames '$SLURM_JOB_NODELIST' printed no host"
  export MASTER_ADDR MASTER_PORT

  if [ "$default_mounts" = 1 ]; then
    mkdir -p "$CACHE_DIR" || megaslim_die "cannot create CACHE_DIR $CACHE_DIR"
  fi
  # Seen inside the container (srun passes the environment on): caches on the /cache mount, and no
  # ~/.local packages shadowing the image's.
  export MEGASLIM_CACHE=/cache/megaslim HF_HOME=/cache/huggingface PYTHONNOUSERSITE=1

  local -a cmd=(srun --nodes "$SLURM_NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1
    --container-image "$CONTAINER_IMAGE")
  if [ -n "$MOUNTS" ]; then
    cmd+=(--container-mounts "$MOUNTS")
  fi
  cmd+=(--container-workdir "$CONTAINER_WORKDIR" ${srun_args[@]+"${srun_args[@]}"}
    torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE"
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID"
    ${torchrun_args[@]+"${torchrun_args[@]}"}
    "$launcher" --config "$CONFIG" ${overrides[@]+"${overrides[@]}"})

  echo "megaslim slurm: job $SLURM_JOB_ID, $SLURM_NNODES node(s) x $GPUS_PER_NODE GPU(s)," \
    "rendezvous $MASTER_ADDR:$MASTER_PORT"
  printf '%q ' "${cmd[@]}"
  echo
  exec "${cmd[@]}"
}
