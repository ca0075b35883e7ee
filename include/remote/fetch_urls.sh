#!/usr/bin/env bash
# Download files onto the instance from (presigned) URLs, resuming, and verify each one.
#
# usage: fetch_urls.sh WORKDIR < list
# Each stdin line: SHA256 <TAB> MD5 <TAB> SIZE <TAB> RELPATH <TAB> URL   (a checksum may be "-")
# URLs come on stdin, never in an argument list (they carry a signature), and are handed to
# curl through its config on stdin; nothing here prints a URL.
# A file goes to WORKDIR/RELPATH.partial, is resumed if a previous try was cut, checked against
# SIZE and the given checksums, then renamed into place; a mismatch is downloaded once more from
# scratch, then fails. Prints "RELPATH <TAB> SIZE <TAB> SHA256" per file.
# Exit status: 0 all good; 20 a download failed; 21 a checksum or size mismatch after a retry.
set -u
workdir=${1:?workdir}
cd "$workdir" || exit 20

download() {  # URL on stdin-free fd: $1 url, $2 dest, $3 resume 0/1
  if command -v curl >/dev/null 2>&1; then
    local resume=()
    [ "$3" = 1 ] && resume=(-C -)
    printf 'url = "%s"\n' "$1" | curl -K - -fsS --retry 5 --retry-delay 2 --connect-timeout 30 \
      "${resume[@]}" -o "$2"
  else
    local cont=()
    [ "$3" = 1 ] && cont=(-c)
    printf '%s\n' "$1" | wget -q --tries=5 "${cont[@]}" -O "$2" -i -
  fi
}

while IFS=$'\t' read -r sha md5 size rel url; do
  [ -n "${rel:-}" ] || continue
  case "$rel" in /*|*..*) echo "refusing path $rel" >&2; exit 20 ;; esac
  mkdir -p "$(dirname "$rel")"
  ok=0
  for attempt in 1 2; do
    have=$(stat -c %s "$rel.partial" 2>/dev/null || echo 0)
    if [ "$attempt" = 2 ] || [ "$have" -gt "$size" ]; then rm -f "$rel.partial"; have=0; fi
    if [ "$have" -lt "$size" ] || [ "$size" = 0 ]; then
      if ! download "$url" "$rel.partial" "$([ "$have" -gt 0 ] && echo 1 || echo 0)"; then
        echo "$rel: download failed" >&2
        continue
      fi
    fi
    got_size=$(stat -c %s "$rel.partial" 2>/dev/null || echo -1)
    got_sha=$(sha256sum < "$rel.partial" | cut -d' ' -f1)
    if [ "$got_size" != "$size" ]; then
      echo "$rel: size $got_size, expected $size" >&2; continue
    fi
    if [ "$sha" != - ] && [ "$got_sha" != "$sha" ]; then
      echo "$rel: SHA256 $got_sha, expected $sha" >&2; continue
    fi
    if [ "$md5" != - ] && [ "$(md5sum < "$rel.partial" | cut -d' ' -f1)" != "$md5" ]; then
      echo "$rel: MD5 does not match the object's ETag" >&2; continue
    fi
    mv -f "$rel.partial" "$rel"
    printf '%s\t%s\t%s\n' "$rel" "$got_size" "$got_sha"
    ok=1
    break
  done
  [ "$ok" = 1 ] || { echo "$rel: giving up after a second download" >&2; exit 21; }
done
