#!/usr/bin/env bash
# Run the trainer detached from the task that started it, in its own process group.
#
# usage: setsid run_trainer.sh WORKDIR -- COMMAND [ARGS...]
#
# Writes, relative to WORKDIR:
#   run/pgid       the process group to kill (this script is its leader, started with setsid)
#   run/trainer.pid the trainer's pid
#   run/exit_code  the trainer's exit status (128+N when killed by signal N), written atomically
#                  when it ends; its absence with no live trainer means the wrapper itself died.
#   logs/trainer.log the trainer's stdout and stderr.
# Starting it again while a trainer runs, or after one ended, does nothing: a retried task
# re-attaches instead of starting a second trainer.
set -u
workdir=$1
shift
[ "${1:-}" = "--" ] && shift
cd "$workdir" || exit 97
mkdir -p run logs
if [ -e run/exit_code ]; then
  exit 0
fi
if [ -s run/trainer.pid ] && kill -0 "$(cat run/trainer.pid)" 2>/dev/null; then
  exit 0
fi
echo $$ > run/pgid
"$@" >> logs/trainer.log 2>&1 < /dev/null &
child=$!
echo "$child" > run/trainer.pid.tmp && mv run/trainer.pid.tmp run/trainer.pid
trap 'kill -TERM "$child" 2>/dev/null' TERM INT HUP
while :; do
  wait "$child"
  code=$?
  # wait returns >128 when interrupted by a trapped signal; keep waiting for the real exit.
  kill -0 "$child" 2>/dev/null || break
done
echo "$code" > run/exit_code.tmp && mv run/exit_code.tmp run/exit_code
