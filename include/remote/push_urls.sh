#!/usr/bin/env bash
# Upload files from the instance to (presigned PUT) URLs.
#
#   push_urls.sh hash WORKDIR DIR       prints "SIZE <TAB> SHA256 <TAB> MD5 <TAB> RELPATH" for
#                                       every regular file under WORKDIR/DIR whose path holds no
#                                       control character (the worker presigns these)
#   push_urls.sh hash-list WORKDIR < list
#                                       the same for each NUL-terminated RELPATH on stdin that is a
#                                       regular file reached without a symlink (others: not printed)
#   push_urls.sh put  WORKDIR < list    each stdin line: RELPATH <TAB> URL; prints "sent <TAB> RELPATH"
#                                       when sent, "skipped <TAB> RELPATH" for one that is no longer
#                                       a regular file reached without a symlink (never followed)
# URLs come on stdin only (they carry a signature) and reach curl through its config on stdin.
# The worker checks every object's size and ETag (MD5) afterwards.
# Exit status: 0 all sent; 22 an upload failed.
set -u
mode=${1:?mode}
workdir=${2:?workdir}
cd "$workdir" || exit 22
here=$(pwd -P)

# A plain relative path to a regular file, no part of it a symlink (checked as resolved).
regular() {
  case "$1" in /* | .. | ../* | */.. | */../* | '') return 1 ;; esac
  [ -f "$1" ] && [ ! -L "$1" ] && [ "$(realpath -e -- "$1" 2>/dev/null)" = "$here/$1" ]
}

facts() {
  printf '%s\t%s\t%s\t%s\n' "$(stat -c %s -- "$1")" "$(sha256sum < "$1" | cut -d' ' -f1)" \
    "$(md5sum < "$1" | cut -d' ' -f1)" "$1"
}

case "$mode" in
hash)
  dir=${3:?dir}
  [ -d "$dir" ] || exit 0
  LC_ALL=C find "$dir" -type f ! -name '*.partial' ! -path '*[[:cntrl:]]*' -print0 |
    while IFS= read -r -d '' f; do facts "$f"; done
  ;;
hash-list)
  while IFS= read -r -d '' f; do
    if regular "$f"; then facts "$f"; fi
  done
  ;;
put)
  while IFS=$'\t' read -r rel url; do
    [ -n "${rel:-}" ] || continue
    if ! regular "$rel"; then
      printf 'skipped\t%s\n' "$rel"
      continue
    fi
    if command -v curl >/dev/null 2>&1; then
      printf 'url = "%s"\n' "$url" | curl -K - -fsS --retry 5 --retry-delay 2 --connect-timeout 30 \
        -T "$rel" -o /dev/null || { echo "$rel: upload failed" >&2; exit 22; }
    else
      echo "curl is needed on the instance for direct uploads" >&2; exit 22
    fi
    printf 'sent\t%s\n' "$rel"
  done
  ;;
*) echo "unknown mode $mode" >&2; exit 2 ;;
esac
