#!/usr/bin/env bash
# Upload files from the instance to (presigned PUT) URLs.
#
#   push_urls.sh hash WORKDIR DIR       prints "SIZE <TAB> SHA256 <TAB> MD5 <TAB> RELPATH" for
#                                       every file under WORKDIR/DIR (the worker presigns these)
#   push_urls.sh put  WORKDIR < list    each stdin line: RELPATH <TAB> URL; prints RELPATH when sent
# URLs come on stdin only (they carry a signature) and reach curl through its config on stdin.
# The worker checks every object's size and ETag (MD5) afterwards.
# Exit status: 0 all sent; 22 an upload failed.
set -u
mode=${1:?mode}
workdir=${2:?workdir}
cd "$workdir" || exit 22
case "$mode" in
hash)
  dir=${3:?dir}
  [ -d "$dir" ] || exit 0
  find "$dir" -type f ! -name '*.partial' -print0 | while IFS= read -r -d '' f; do
    printf '%s\t%s\t%s\t%s\n' "$(stat -c %s "$f")" "$(sha256sum < "$f" | cut -d' ' -f1)" \
      "$(md5sum < "$f" | cut -d' ' -f1)" "$f"
  done
  ;;
put)
  while IFS=$'\t' read -r rel url; do
    [ -n "${rel:-}" ] || continue
    case "$rel" in /*|*..*) echo "refusing path $rel" >&2; exit 22 ;; esac
    if command -v curl >/dev/null 2>&1; then
      printf 'url = "%s"\n' "$url" | curl -K - -fsS --retry 5 --retry-delay 2 --connect-timeout 30 \
        -T "$rel" -o /dev/null || { echo "$rel: upload failed" >&2; exit 22; }
    else
      echo "curl is needed on the instance for direct uploads" >&2; exit 22
    fi
    printf '%s\n' "$rel"
  done
  ;;
*) echo "unknown mode $mode" >&2; exit 2 ;;
esac
