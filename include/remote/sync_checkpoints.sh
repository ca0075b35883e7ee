#!/usr/bin/env bash
# Keep the trainer's latest checkpoint in the job's outputs URI while it trains: the disk of an
# interrupted (spot) instance is lost with it, and a replacement instance resumes from this copy
# (storage.restore_checkpoint).
#
# usage: sync_checkpoints.sh WORKDIR INTERVAL   (started detached by storage.start_checkpoint_sync)
#
# The checkpoint contract (any trainer, not only include/trainer/train.py):
#   outputs/checkpoints/latest.json is a JSON object that the trainer replaces atomically once
#   every file of the checkpoint is complete. Each string field whose name ends in "_path" (at any
#   depth) names one file of that checkpoint, relative to outputs/: no absolute path, no "..", no
#   leading "-", no backslash or double quote. Other fields are free.
#
# Every INTERVAL seconds, when latest.json changed (mtime, size, inode) since the last upload, the
# files it names and a snapshot of latest.json (last member) go into run/ckpt.tar.tmp, with paths
# relative to outputs/, and the archive goes to the destination in run/checkpoint_sync.url (one
# line, re-read on every upload, so a fresh URL needs no restart):
#   http(s)://...    a presigned PUT URL of <outputs_uri>/checkpoints/latest.tar; it carries a
#                    signature: it reaches curl through its config on stdin, never an argument
#                    list, and is never printed
#   /absolute/path   a local file, replaced atomically (a host that is the worker itself)
# The change is remembered (run/checkpoint_sync.stamp) only once the upload succeeded; an error is
# logged to logs/checkpoint_sync.log (the same one at most once a minute) and the next round tries
# again: the loop never dies of one.
# The loop ends once the trainer ended (run/exit_code exists, or run/trainer.pid names a dead
# process), after a final pass; it also ends when the work directory is removed (teardown).
# Needs bash, coreutils, grep, sed, tar and curl; no python.
set -u
workdir=${1:?workdir}
interval=${2:?interval}
cd "$workdir" || exit 2
mkdir -p run logs
echo $$ > run/checkpoint_sync.pid.tmp && mv -f run/checkpoint_sync.pid.tmp run/checkpoint_sync.pid

pointer=outputs/checkpoints/latest.json
stage=run/ckpt-stage
archive=run/ckpt.tar.tmp

log() { printf '%s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >> logs/checkpoint_sync.log; }

# An error of a round: logged, but the same one at most once a minute; returns 1.
last_error='' last_error_at=0
fail() {
  local now
  now=$(date +%s)
  if [ "$*" != "$last_error" ] || [ $((now - last_error_at)) -ge 60 ]; then
    log "$*"
    last_error=$* last_error_at=$now
  fi
  return 1
}

stamp_of() { stat -c '%.9Y %s %i' "$1" 2>/dev/null; }

trainer_ended() {
  [ -e run/exit_code ] && return 0
  local pid state
  pid=$(cat run/trainer.pid 2>/dev/null) || return 1  # not started yet (or a container runtime)
  case "$pid" in '' | *[!0-9]*) return 1 ;; esac
  kill -0 "$pid" 2>/dev/null || return 0
  state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)
  [ "$state" = Z ]
}

# The "_path" string fields of a JSON file, one per line.
named_paths() {
  tr -d '\r\n' < "$1" | grep -o '"[^"]*_path"[[:space:]]*:[[:space:]]*"[^"]*"' \
    | sed 's/^"[^"]*"[[:space:]]*:[[:space:]]*"//; s/"$//'
}

# One round: returns 0 when nothing changed or the change was uploaded, 1 on an error.
sync_once() {
  [ -f "$pointer" ] || return 0
  local stamp rel err
  stamp=$(stamp_of "$pointer") || return 0
  [ "$stamp" = "$(cat run/checkpoint_sync.stamp 2>/dev/null)" ] && return 0
  if ! { rm -rf "$stage" && mkdir -p "$stage/checkpoints"; }; then
    fail "cannot create $stage"
    return
  fi
  cp "$pointer" "$stage/checkpoints/latest.json" || { fail "cannot read $pointer"; return; }
  # Replaced while it was copied: the newer one is taken next round.
  [ "$(stamp_of "$pointer")" = "$stamp" ] || return 0
  local files=()
  while IFS= read -r rel; do
    case "$rel" in
      '' | checkpoints/latest.json) continue ;;
      /* | -* | .. | ../* | */.. | */../* | *\\*)
        fail "latest.json names \"$rel\", not a path relative to outputs/: checkpoint not synced"
        return
        ;;
    esac
    if [ ! -f "outputs/$rel" ]; then
      fail "latest.json names $rel, which is not a file under outputs/: trying again next round"
      return
    fi
    files+=("$rel")
  done < <(named_paths "$stage/checkpoints/latest.json")
  rm -f "$archive"
  if ! err=$(tar -cf "$archive" -C "$PWD/outputs" ${files[@]+"${files[@]}"} \
    -C "$PWD/$stage" checkpoints/latest.json 2>&1); then
    rm -f "$archive"
    fail "tar of the checkpoint failed (trying again next round): $(printf '%s' "$err" | tail -2 | tr '\n' ' ')"
    return
  fi
  local dest=
  IFS= read -r dest < run/checkpoint_sync.url || [ -n "$dest" ] || {
    fail "run/checkpoint_sync.url is missing or empty: checkpoint not synced"
    return
  }
  case "$dest" in
    http://* | https://*)
      if ! err=$(printf 'url = "%s"\n' "$dest" | curl -K - -fsS --retry 3 --retry-delay 2 \
        --connect-timeout 30 -T "$archive" -o /dev/null 2>&1); then
        # curl names hosts, not URLs; a query string is cut anyway, in case one ever shows up.
        fail "upload failed (trying again next round): $(printf '%s' "$err" \
          | sed 's/[?][^[:space:]]*/?<redacted>/g' | tail -2 | tr '\n' ' ')"
        return
      fi
      ;;
    /*)
      if ! err=$({ mkdir -p "$(dirname "$dest")" && cp "$archive" "$dest.partial" \
        && mv -f "$dest.partial" "$dest"; } 2>&1); then
        fail "copy to $dest failed (trying again next round): $err"
        return
      fi
      ;;
    *)
      fail "run/checkpoint_sync.url holds neither an http(s) URL nor an absolute path: not synced"
      return
      ;;
  esac
  printf '%s\n' "$stamp" > run/checkpoint_sync.stamp.tmp && mv -f run/checkpoint_sync.stamp.tmp run/checkpoint_sync.stamp
  last_error=''
  log "uploaded checkpoint: ${files[*]:-} checkpoints/latest.json ($(stat -c %s "$archive") bytes)"
  rm -f "$archive"
  rm -rf "$stage"
  return 0
}

log "checkpoint sync started (every $interval s)"
while :; do
  # Relative paths fail once the work directory is removed, even if one is made again by the name.
  [ -d run ] || exit 0
  if trainer_ended; then
    for _attempt in 1 2 3; do
      sync_once && break
      sleep "$interval"
    done
    log "the trainer ended: final pass done, checkpoint sync stops"
    exit 0
  fi
  sync_once
  sleep "$interval"
done
