#!/usr/bin/env bash
# The trainer as a detached Docker container, run on the instance (the Docker runtime).
#
#   run_container.sh start  WORKDIR NAME IMAGE USER GPUS MEMORY CPUS SHM PULL [-- COMMAND...]
#   run_container.sh watch  WORKDIR NAME        (started detached by `start`)
#   run_container.sh status WORKDIR NAME        prints "<exit_code|-> <running 0/1> <oom 0/1|-> <started 0/1>"
#   run_container.sh stop   WORKDIR NAME GRACE
#   run_container.sh remove WORKDIR NAME
#
# start: registry credentials, if any, come on stdin as three lines (registry, username,
# password); they are handed to `docker login --password-stdin` and never appear in an argument
# list or a log. Docker's client config lives in WORKDIR/run/docker, so the login is the run's
# own; it is logged out right after the pull. The container is named NAME (deterministic per
# job): starting again while it exists re-attaches instead of starting a second one.
# GPUS is "all" or "" (no GPUs); MEMORY ("8g"), CPUS ("4") and SHM ("1g") may be empty.
# PULL is "always" (pull, fail if that fails) or "missing" (use a local image, pull otherwise).
#
# The watcher follows `docker logs -f` into WORKDIR/logs/trainer.log, waits for the container and
# writes run/exit_code (atomically, last) and run/oom_killed.
#
# Exit status of start: 0 started or re-attached; 10 login refused; 11 image could not be pulled
# (missing or no access); 12 docker run failed; 13 no usable docker. The reason is on stderr.
set -u
mode=${1:?mode}
workdir=${2:?workdir}
name=${3:?container name}
cd "$workdir" || { echo "work directory $workdir is missing" >&2; exit 13; }
mkdir -p run logs outputs
export DOCKER_CONFIG="$workdir/run/docker"
mkdir -p "$DOCKER_CONFIG" && chmod 700 "$DOCKER_CONFIG"

container_state() {  # "<running true|false> <exit code> <oom true|false>" or nothing if absent
  docker inspect --type container -f '{{.State.Running}} {{.State.ExitCode}} {{.State.OOMKilled}}' \
    "$name" 2>/dev/null
}

pid_alive() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
    && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != "Z" ]
}

start_watcher() {
  if pid_alive run/watcher.pid; then return 0; fi
  nohup setsid bash "$0" watch "$workdir" "$name" </dev/null >/dev/null 2>&1 &
  echo $! > run/watcher.pid.tmp && mv run/watcher.pid.tmp run/watcher.pid
}

case "$mode" in
start)
  image=${4:?image}; user=${5:-}; gpus=${6:-}; memory=${7:-}; cpus=${8:-}; shm=${9:-}; pull=${10:-missing}
  shift 10
  [ "${1:-}" = "--" ] && shift
  if ! docker info >/dev/null 2>&1; then
    echo "docker is not usable on this host: $(docker info 2>&1 | tail -1)" >&2
    exit 13
  fi
  if [ -n "$(container_state)" ]; then
    echo "re-attaching to container $name"
    echo "$name" > run/container
    [ -e run/exit_code ] || start_watcher
    exit 0
  fi
  registry=; username=; password=
  IFS= read -r registry || true
  IFS= read -r username || true
  IFS= read -r password || true
  if [ -n "$username" ]; then
    if ! out=$(printf '%s' "$password" | docker login --username "$username" --password-stdin "$registry" 2>&1); then
      echo "docker login to ${registry:-the default registry} as $username was refused: $(echo "$out" | tail -1)" >&2
      exit 10
    fi
  fi
  unset password
  pulled=0
  if [ "$pull" = always ] || ! docker image inspect "$image" >/dev/null 2>&1; then
    out=$(docker pull --quiet "$image" 2>&1) && pulled=1
  else
    pulled=1
  fi
  # The login was for this pull only: its stored credential goes at once.
  [ -n "$username" ] && docker logout "$registry" >/dev/null 2>&1
  if [ "$pulled" != 1 ]; then
    echo "image $image could not be pulled: $(echo "$out" | tail -2 | tr '\n' ' ')" >&2
    exit 11
  fi
  args=(run -d --name "$name" --label "gpu-training.instance=$name"
        --mount "type=bind,source=$workdir,target=/workspace" --workdir /workspace
        --env TRAINING_CONFIG=/workspace/config/job.yaml --env TRAINING_OUTPUT_DIR=/workspace/outputs
        --env HOME=/workspace --env PYTHONUNBUFFERED=1 --init)
  [ -n "$user" ] && args+=(--user "$user")
  [ -n "$gpus" ] && args+=(--gpus "$gpus")
  [ -n "$memory" ] && args+=(--memory "$memory" --memory-swap "$memory")
  [ -n "$cpus" ] && args+=(--cpus "$cpus")
  [ -n "$shm" ] && args+=(--shm-size "$shm")
  if [ $# -gt 0 ]; then
    args+=(--entrypoint "$1" "$image" "${@:2}")
  else
    args+=("$image")
  fi
  if ! out=$(docker "${args[@]}" 2>&1); then
    echo "docker run of $image failed: $(echo "$out" | tail -2 | tr '\n' ' ')" >&2
    docker rm -f "$name" >/dev/null 2>&1
    exit 12
  fi
  echo "$name" > run/container
  start_watcher
  echo "started container $name from $image"
  ;;
watch)
  : > logs/trainer.log  # docker logs replays the container's whole output
  docker logs -f "$name" >> logs/trainer.log 2>&1 &
  logs=$!
  code=$(docker wait "$name" 2>/dev/null)
  wait "$logs"
  read -r _running last_code oom <<< "$(container_state)"
  code=${code:-${last_code:-}}
  [ -n "$code" ] || exit 0  # the container was removed: teardown is under way
  [ "$oom" = true ] && echo 1 > run/oom_killed || echo 0 > run/oom_killed
  echo "$code" > run/exit_code.tmp && mv run/exit_code.tmp run/exit_code
  ;;
status)
  if [ -e run/exit_code ]; then
    echo "$(cat run/exit_code) 0 $(cat run/oom_killed 2>/dev/null || echo -) 1"
    exit 0
  fi
  read -r running code oom <<< "$(container_state)"
  if [ -z "${running:-}" ]; then  # no container: never started, or removed behind our back
    [ -e run/container ] && echo "- 0 - 1" || echo "- 0 - 0"
    exit 0
  fi
  if [ "$running" = true ]; then echo "- 1 - 1"; exit 0; fi
  # Exited: the watcher writes the exit code once the log is drained; report it ourselves only
  # when no watcher is left to do so.
  if pid_alive run/watcher.pid; then echo "- 1 - 1"; exit 0; fi
  [ "$oom" = true ] && o=1 || o=0
  echo "$code 0 $o 1"
  ;;
stop)
  grace=${4:-10}
  [ -n "$(container_state)" ] && docker stop -t "$grace" "$name" >/dev/null 2>&1
  exit 0
  ;;
remove)
  docker rm -f "$name" >/dev/null 2>&1
  if pid_alive run/watcher.pid; then kill "$(cat run/watcher.pid)" 2>/dev/null; fi
  rm -rf "$DOCKER_CONFIG"
  exit 0
  ;;
*)
  echo "unknown mode $mode" >&2
  exit 2
  ;;
esac
