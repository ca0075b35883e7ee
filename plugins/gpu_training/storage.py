"""Datasets in and outputs out: ``file://`` and ``s3://`` storage, every file checksummed.

S3 goes through the amazon provider's ``S3Hook`` (the job's ``aws_conn_id``, default ``aws_default``; its extra
``endpoint_url`` points it at MinIO or a test server). Outputs of a job go to
``<outputs_uri>/<job uuid>/`` with a ``MANIFEST.sha256`` (``sha256sum -c`` format) written last.
While a job trains, its latest checkpoint is kept at ``<job outputs>/checkpoints/latest.tar``
(include/remote/sync_checkpoints.sh) so that a job relaunched after an interruption resumes from it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from gpu_training.errors import HostError, NotRegularFileError, StorageError, TransferError
from gpu_training.hosts.base import (
    CHECKPOINT_POINTER,
    CHECKPOINT_SYNC_LOG,
    CHECKPOINT_SYNC_PID,
    CHECKPOINT_SYNC_STAMP,
    CHECKPOINT_SYNC_URL,
    DATA_DIR,
    FETCH_URLS_SCRIPT,
    LOG_PATH,
    OPEN_REGULAR_SCRIPT,
    OUTPUT_DIR,
    PUSH_URLS_SCRIPT,
    SYNC_CHECKPOINTS_SCRIPT,
    Host,
    sha256_file,
)
from gpu_training.results.store import ArtifactRecord, SkippedOutput

log = logging.getLogger(__name__)

AWS_CONN_ID = "aws_default"
MANIFEST_NAME = "MANIFEST.sha256"


def embedded_storage_root() -> Path:
    if os.environ.get("GPU_TRAINING_STORAGE"):
        return Path(os.environ["GPU_TRAINING_STORAGE"])
    from gpu_training.hooks.results import airflow_home

    return airflow_home() / "storage"


def default_outputs_uri() -> str:
    return (embedded_storage_root() / "outputs").as_uri()


def job_outputs_uri(outputs_uri: str, job_uuid: str) -> str:
    return f"{(outputs_uri or default_outputs_uri()).rstrip('/')}/{job_uuid}"


@dataclasses.dataclass(frozen=True)
class Location:
    scheme: str
    bucket: str  # empty for file://
    path: str  # filesystem path for file://, key (no leading slash) for s3://

    def child(self, relpath: str) -> Location:
        joined = f"{self.path.rstrip('/')}/{relpath}" if self.path else relpath
        return Location(self.scheme, self.bucket, joined)

    @property
    def uri(self) -> str:
        return Path(self.path).as_uri() if self.scheme == "file" else f"s3://{self.bucket}/{self.path}"


def parse_uri(uri: str) -> Location:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{uri}: file:// URIs must be local (file:///path)")
        return Location("file", "", unquote(parsed.path))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri}: an s3:// URI needs a bucket (s3://bucket/key)")
        return Location("s3", parsed.netloc, unquote(parsed.path).lstrip("/"))
    raise StorageError(f"{uri}: unsupported scheme {parsed.scheme!r}; use file:// or s3://")


def _s3_hook(aws_conn_id: str = AWS_CONN_ID) -> Any:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id=aws_conn_id or AWS_CONN_ID)


def presigned_get_url(uri: str, *, expires_in: int = 3600, aws_conn_id: str = AWS_CONN_ID) -> str:
    """A presigned GET URL of an ``s3://`` object (through the job's AWS connection), valid ``expires_in`` s."""
    loc = parse_uri(uri)
    if loc.scheme != "s3":
        raise StorageError(f"{uri}: only s3:// objects have presigned URLs")
    client = _s3_hook(aws_conn_id).get_conn()
    return str(
        client.generate_presigned_url(
            "get_object", Params={"Bucket": loc.bucket, "Key": loc.path}, ExpiresIn=expires_in
        )
    )


def _safe_relpath(relpath: str) -> str:
    parts = Path(relpath).parts
    if Path(relpath).is_absolute() or ".." in parts or not parts:
        raise StorageError(f"refusing path {relpath!r}: it escapes its directory")
    return Path(*parts).as_posix()


# --- datasets -----------------------------------------------------------------------------------


def fetch_dataset(
    dataset_uri: str,
    host: Host,
    *,
    dest_dir: str = DATA_DIR,
    check_path: Callable[[Path], None] | None = None,
    aws_conn_id: str = AWS_CONN_ID,
) -> list[tuple[str, int, str]]:
    """Copy the dataset into the host's ``data/`` directory (or ``dest_dir``); returns ``(relpath, size, sha256)``.

    ``check_path`` is asked about every local file before it is read (the deployment's allowed
    roots, symlinks resolved); it raises to refuse one."""
    loc = parse_uri(dataset_uri)
    is_prefix = dataset_uri.endswith("/")
    copied: list[tuple[str, int, str]] = []
    if loc.scheme == "file":
        src = Path(loc.path)
        check = check_path or (lambda path: None)
        if src.is_dir():
            for rf in sorted(p for p in src.rglob("*") if p.is_file()):
                check(rf)
                rel = rf.relative_to(src).as_posix()
                copied.append((f"{dest_dir}/{rel}", rf.stat().st_size, host.put_file(rf, f"{dest_dir}/{rel}")))
        elif src.is_file():
            check(src)
            copied.append((f"{dest_dir}/{src.name}", src.stat().st_size, host.put_file(src, f"{dest_dir}/{src.name}")))
        else:
            raise StorageError(f"dataset {dataset_uri} does not exist")
        return copied
    hook = _s3_hook(aws_conn_id)
    try:
        if is_prefix or not hook.check_for_key(loc.path, bucket_name=loc.bucket):
            prefix = loc.path if loc.path.endswith("/") or not loc.path else loc.path + "/"
            keys = [k for k in (hook.list_keys(bucket_name=loc.bucket, prefix=prefix) or []) if not k.endswith("/")]
            if not keys:
                raise StorageError(f"dataset {dataset_uri} does not exist (no object and no objects under it)")
            pairs = [(k, k[len(prefix) :]) for k in keys]
        else:
            pairs = [(loc.path, loc.path.rsplit("/", 1)[-1])]
        with tempfile.TemporaryDirectory(prefix="gpu-dataset-") as tmp:
            for key, rel in pairs:
                rel = _safe_relpath(rel)
                local = Path(tmp) / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                hook.get_conn().download_file(loc.bucket, key, str(local))
                copied.append((f"{dest_dir}/{rel}", local.stat().st_size, host.put_file(local, f"{dest_dir}/{rel}")))
    except StorageError:
        raise
    except Exception as err:  # botocore errors carry the bucket/key; keep their message
        raise StorageError(f"could not read dataset {dataset_uri}: {err}") from err
    return copied


@dataclasses.dataclass(frozen=True)
class S3Object:
    key: str
    relpath: str  # under data/
    size: int
    sha256: str | None  # from the object's own SHA256 checksum, when it was stored with one
    md5: str | None  # the ETag of a single-part upload is the content's MD5


def list_dataset_objects(
    dataset_uri: str, *, dest_dir: str = DATA_DIR, aws_conn_id: str = AWS_CONN_ID
) -> list[S3Object]:
    """The objects of an ``s3://`` dataset (one object, or every object under a prefix)."""
    import base64

    loc = parse_uri(dataset_uri)
    client = _s3_hook(aws_conn_id).get_conn()
    try:
        found: list[dict[str, Any]] = []
        prefix = loc.path
        if not dataset_uri.endswith("/") and loc.path:
            exact = client.list_objects_v2(Bucket=loc.bucket, Prefix=loc.path, MaxKeys=1).get("Contents") or []
            if exact and exact[0]["Key"] == loc.path:
                found = exact
                prefix = loc.path.rsplit("/", 1)[0] + "/" if "/" in loc.path else ""
            else:
                prefix = loc.path + "/"
        if not found:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
                found.extend(o for o in page.get("Contents") or [] if not o["Key"].endswith("/"))
        if not found:
            raise StorageError(f"dataset {dataset_uri} does not exist (no object and no objects under it)")
        objects = []
        for obj in found:
            sha = None
            if "SHA256" in (obj.get("ChecksumAlgorithm") or []):
                head = client.head_object(Bucket=loc.bucket, Key=obj["Key"], ChecksumMode="ENABLED")
                if head.get("ChecksumSHA256") and "-" not in head["ChecksumSHA256"]:
                    sha = base64.b64decode(head["ChecksumSHA256"]).hex()
            etag = str(obj.get("ETag", "")).strip('"')
            md5 = etag if len(etag) == 32 and "-" not in etag else None
            rel = _safe_relpath(obj["Key"][len(prefix) :])
            objects.append(S3Object(obj["Key"], f"{dest_dir}/{rel}", int(obj["Size"]), sha, md5))
        return objects
    except StorageError:
        raise
    except Exception as err:
        raise StorageError(f"could not list dataset {dataset_uri}: {err}") from err


def fetch_dataset_direct(
    dataset_uri: str, host: Host, *, expiry_seconds: int, dest_dir: str = DATA_DIR, aws_conn_id: str = AWS_CONN_ID
) -> list[tuple[str, int, str]]:
    """Let the instance download an ``s3://`` dataset itself from presigned URLs (resumed,
    size and checksum verified there): no byte of it passes through this worker."""
    loc = parse_uri(dataset_uri)
    objects = list_dataset_objects(dataset_uri, dest_dir=dest_dir, aws_conn_id=aws_conn_id)
    client = _s3_hook(aws_conn_id).get_conn()
    lines = []
    for obj in objects:
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": loc.bucket, "Key": obj.key}, ExpiresIn=expiry_seconds
        )
        lines.append("\t".join([obj.sha256 or "-", obj.md5 or "-", str(obj.size), obj.relpath, url]))
    rc, out, err = host.script(
        'exec bash "$1" "$2"',
        host.remote_script(FETCH_URLS_SCRIPT),
        host.workdir,
        stdin=("\n".join(lines) + "\n").encode(),
        timeout=24 * 3600,
        check=False,
    )
    if rc != 0:
        raise TransferError(f"the instance could not fetch dataset {dataset_uri}: {err.strip()[-1500:]}")
    copied = []
    for line in out.splitlines():
        rel, size, digest = line.split("\t")
        copied.append((rel, int(size), digest))
    if len(copied) != len(objects):
        raise TransferError(f"dataset {dataset_uri}: {len(copied)} of {len(objects)} files arrived")
    return copied


# --- outputs ------------------------------------------------------------------------------------


def _put(local: Path, dest: Location, sha256: str, aws_conn_id: str = AWS_CONN_ID) -> None:
    """Write one file to its destination and verify it arrived intact."""
    size = local.stat().st_size
    if dest.scheme == "file":
        target = Path(dest.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".partial")
        shutil.copyfile(local, tmp)
        if tmp.stat().st_size != size or sha256_file(tmp) != sha256:
            tmp.unlink(missing_ok=True)
            raise TransferError(f"{dest.uri}: size or SHA256 mismatch after copy")
        os.replace(tmp, target)
        return
    hook = _s3_hook(aws_conn_id)
    hook.load_file(str(local), dest.path, bucket_name=dest.bucket, replace=True)
    head = hook.head_object(dest.path, bucket_name=dest.bucket)
    if head is None or int(head.get("ContentLength", -1)) != size:
        raise TransferError(f"{dest.uri}: uploaded size does not match the local {size} bytes")


#: The longest artifact name (``artifacts.name``) and S3 key.
MAX_NAME_CHARS = 1024
MAX_S3_KEY_BYTES = 1024
#: Skipped outputs said one by one (in the task log, to ``on_skipped``); the rest are counted.
MAX_SKIPPED_SAID = 100


def shown_name(name: str) -> str:
    """A file name as it can be shown and stored: control characters and bytes that are not UTF-8
    written as escapes (``\\n``, ``\\x01``, ``\\xff``)."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def output_name_problem(name: str, dest: Location | None = None) -> str | None:
    """Why an output named ``name`` (relative to ``outputs/``) cannot be uploaded as itself, or None.

    A newline or control character breaks every line-based list it passes through (the manifest,
    the instance's upload list) and S3's XML listings; a name that is not UTF-8 has no S3 key."""
    if any(ch < " " or "\x7f" <= ch <= "\x9f" for ch in name):
        return "its name holds a newline or another control character"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8"
    try:
        _safe_relpath(name)
    except StorageError:
        return "its name escapes outputs/"
    if len(name) > MAX_NAME_CHARS:
        return f"its name is longer than {MAX_NAME_CHARS} characters"
    if dest is not None and dest.scheme == "s3" and len(dest.child(name).path.encode()) > MAX_S3_KEY_BYTES:
        return f"its S3 key would be longer than {MAX_S3_KEY_BYTES} bytes"
    return None


_KIND_REASONS = {
    "symlink": "a symbolic link: links are never followed (what it points to is not uploaded through it)",
    "other": "not a regular file (a FIFO, device or socket)",
}


def _output_sources(host: Host, dest: Location | None = None) -> tuple[list[tuple[str, str]], list[SkippedOutput]]:
    """(path on the host, artifact name) of everything a job uploads, and what is skipped and why:
    only regular files with plain names, never through a symlink; the manifest is ours."""
    sources: list[tuple[str, str]] = []
    skipped: list[SkippedOutput] = []
    log_folder, log_name = LOG_PATH.split("/", 1)
    entries = [(OUTPUT_DIR, entry) for entry in host.list_entries(OUTPUT_DIR)]
    entries += [(log_folder, entry) for entry in host.list_entries(log_folder) if entry.path in ("", log_name)]
    for folder, entry in entries:
        remote = f"{folder}/{entry.path}" if entry.path else folder
        name = entry.path if folder == OUTPUT_DIR else remote
        if not entry.path:
            reason = f"{folder}/ is a symbolic link: nothing in it is uploaded"
        else:
            reason = _KIND_REASONS.get(entry.kind) or output_name_problem(name, dest) or ""
        if reason:
            skipped.append(SkippedOutput(shown_name(remote), reason))
        elif name != MANIFEST_NAME:
            sources.append((remote, _safe_relpath(name)))
    return sources, skipped


# A single presigned PUT takes at most 5 GiB; bigger files go through the worker (multipart).
MAX_SINGLE_PUT = 5 * 1024**3


def latest_checkpoint_sources(host: Host) -> set[str]:
    """Host paths of the trainer log and of the latest checkpoint: the pointer
    (``outputs/checkpoints/latest.json``) and every file it names (:func:`checkpoint_files`).
    What a cancelled job keeps; an unreadable pointer keeps the log alone."""
    wanted = {LOG_PATH}
    pointer_path = f"{OUTPUT_DIR}/{CHECKPOINT_POINTER}"
    rc, out, _ = host.script(_READ_POINTER, host.workdir, pointer_path, check=False)
    if rc == 0 and out.strip():
        try:
            pointer = json.loads(out)
        except ValueError:
            return wanted
        wanted.add(pointer_path)
        for rel in checkpoint_files(pointer):
            try:
                wanted.add(f"{OUTPUT_DIR}/{_safe_relpath(rel)}")
            except StorageError:
                continue  # a pointer naming something outside outputs/ names nothing we upload
    return wanted


#: $1 workdir, $2 the checkpoint pointer: its first MiB, if it is a regular file reached without symlinks.
_READ_POINTER = (
    OPEN_REGULAR_SCRIPT
    + r"""
open_regular "$1" "$2" 2>/dev/null || exit 1
head -c 1048576 <&3
"""
)


def upload_outputs(
    host: Host,
    outputs_uri: str,
    job_uuid: str,
    *,
    direct: bool = False,
    expiry_seconds: int = 3600,
    only: set[str] | None = None,
    on_skipped: Callable[[list[SkippedOutput]], None] | None = None,
    aws_conn_id: str = AWS_CONN_ID,
) -> list[ArtifactRecord]:
    """Upload the trainer's outputs and log; every file hashed, manifest last.

    ``direct`` (an ``s3://`` target and a remote instance): the instance PUTs each file to a
    presigned URL and this worker only checks size and ETag (MD5) of what arrived. ``only``: just
    these host paths (e.g. :func:`latest_checkpoint_sources`), the manifest listing them.

    Only regular files with plain names are uploaded, never through a symlink: a symlink (to
    anywhere), a FIFO or device, a name with a newline or control character, or one that is not
    UTF-8 is skipped and everything else uploaded. What was skipped, and why, is logged and handed
    to ``on_skipped`` (at most :data:`MAX_SKIPPED_SAID` one by one, then a count), e.g.
    :meth:`~gpu_training.results.store.ResultsStore.record_skipped_outputs`.
    """
    root = parse_uri(job_outputs_uri(outputs_uri, job_uuid))
    sources, skipped = _output_sources(host, root)
    if only is not None:
        sources = [(remote, name) for remote, name in sources if remote in only]
        skipped = []  # a partial upload (a cancelled job's salvage) says nothing about the rest
    records: list[ArtifactRecord] = []
    if direct and root.scheme == "s3":
        records, sources, refused = _push_direct(host, root, sources, expiry_seconds, aws_conn_id)
        skipped += refused
    with tempfile.TemporaryDirectory(prefix="gpu-outputs-") as tmp:
        for remote_rel, name in sources:
            local = Path(tmp) / name
            try:
                digest = host.fetch_file(remote_rel, local)
            except NotRegularFileError as err:  # swapped for a symlink since it was listed
                skipped.append(SkippedOutput(shown_name(remote_rel), f"{err.what}: not a regular file when fetched"))
                continue
            dest = root.child(name)
            _put(local, dest, digest, aws_conn_id)
            records.append(ArtifactRecord(name=name, uri=dest.uri, size_bytes=local.stat().st_size, sha256=digest))
            local.unlink()
        manifest = Path(tmp) / MANIFEST_NAME
        manifest.write_text("".join(f"{r.sha256}  {r.name}\n" for r in records))
        digest = sha256_file(manifest)
        _put(manifest, root.child(MANIFEST_NAME), digest, aws_conn_id)
        records.append(
            ArtifactRecord(
                name=MANIFEST_NAME,
                uri=root.child(MANIFEST_NAME).uri,
                size_bytes=manifest.stat().st_size,
                sha256=digest,
            )
        )
    _say_skipped(skipped, on_skipped)
    return records


def _say_skipped(skipped: list[SkippedOutput], on_skipped: Callable[[list[SkippedOutput]], None] | None) -> None:
    if not skipped:
        return
    said = skipped[:MAX_SKIPPED_SAID]
    if len(skipped) > len(said):
        said.append(SkippedOutput("...", f"{len(skipped) - len(said)} more outputs skipped"))
    for output in said:
        log.warning("output %s is not uploaded: %s", output.name, output.reason)
    if on_skipped is not None:
        on_skipped(said)


def _push_direct(
    host: Host, root: Location, sources: list[tuple[str, str]], expiry_seconds: int, aws_conn_id: str = AWS_CONN_ID
) -> tuple[list[ArtifactRecord], list[tuple[str, str]], list[SkippedOutput]]:
    """PUT files from the instance to presigned URLs; returns (records, files left to relay, files
    that were no longer regular files inside the work directory when the instance looked)."""
    facts: dict[str, tuple[int, str, str]] = {}
    if sources:
        # Only the files listed, NUL-separated (names never hold a control character here): the
        # instance hashes nothing else, however many files the trainer left.
        _, out, _ = host.script(
            'exec bash "$1" hash-list "$2"',
            host.remote_script(PUSH_URLS_SCRIPT),
            host.workdir,
            stdin=b"".join(remote.encode() + b"\0" for remote, _ in sources),
        )
        for line in out.splitlines():
            size_text, sha_hex, md5_hex, rel = line.split("\t", 3)
            facts[rel] = (int(size_text), sha_hex, md5_hex)
    refused = [
        SkippedOutput(shown_name(remote), "not a regular file inside the work directory when it was hashed")
        for remote, _ in sources
        if remote not in facts
    ]
    sources = [(remote, name) for remote, name in sources if remote in facts]
    client = _s3_hook(aws_conn_id).get_conn()
    direct = [(remote, name) for remote, name in sources if facts[remote][0] <= MAX_SINGLE_PUT]
    relay = [(remote, name) for remote, name in sources if (remote, name) not in direct]
    records: list[ArtifactRecord] = []
    pending = direct
    for _attempt in (1, 2):  # what arrived wrong is sent once more
        if not pending:
            break
        lines = []
        for remote, name in pending:
            url = client.generate_presigned_url(
                "put_object", Params={"Bucket": root.bucket, "Key": root.child(name).path}, ExpiresIn=expiry_seconds
            )
            lines.append(f"{remote}\t{url}")
        rc, out, err = host.script(
            'exec bash "$1" put "$2"',
            host.remote_script(PUSH_URLS_SCRIPT),
            host.workdir,
            stdin=("\n".join(lines) + "\n").encode(),
            timeout=24 * 3600,
            check=False,
        )
        if rc != 0:
            raise TransferError(f"the instance could not upload outputs to {root.uri}: {err.strip()[-1500:]}")
        gone = {line.split("\t", 1)[1] for line in out.splitlines() if line.startswith("skipped\t")}
        refused += [SkippedOutput(shown_name(remote), "not a regular file when it was sent") for remote in sorted(gone)]
        pending = [(remote, name) for remote, name in pending if remote not in gone]
        failed = []
        for remote, name in pending:
            size, sha, md5 = facts[remote]
            dest = root.child(name)
            head = client.head_object(Bucket=root.bucket, Key=dest.path)
            if int(head.get("ContentLength", -1)) != size or str(head.get("ETag", "")).strip('"') != md5:
                failed.append((remote, name))
                continue
            records.append(ArtifactRecord(name=name, uri=dest.uri, size_bytes=size, sha256=sha))
        pending = failed
    if pending:
        raise TransferError(f"{', '.join(n for _, n in pending)}: size or MD5 mismatch in S3 after a re-send")
    return records, relay, refused


# --- checkpoints (spot recovery) -----------------------------------------------------------------

#: The job's latest checkpoint, relative to the job's own outputs URI (``job_outputs_uri(...)``).
CHECKPOINT_ARCHIVE = "checkpoints/latest.tar"
#: SigV4 presigned URLs live at most 7 days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
_RESTORE_TAR = "run/ckpt-restore.tar"

# $1 workdir, $2 file (relative): stdin becomes that file, mode 0600 from its first byte.
_WRITE_PRIVATE_SCRIPT = r"""
cd "$1" || exit 1
mkdir -p "$(dirname "$2")"
umask 077
rm -f "$2.tmp"
cat > "$2.tmp" && chmod 600 "$2.tmp" && mv -f "$2.tmp" "$2"
"""

# $1 workdir, $2 sync script, $3 interval, $4 pid file, $5 log: start it detached unless it runs.
# A pid counts only if it is a live sync_checkpoints process (a zombie has an empty cmdline).
_START_SYNC_SCRIPT = r"""
cd "$1" || exit 1
mkdir -p run logs
pid=$(cat "$4" 2>/dev/null)
case "$pid" in ''|*[!0-9]*) pid= ;; esac
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q sync_checkpoints "/proc/$pid/cmdline" 2>/dev/null; then
  echo running
  exit 0
fi
[ -f "$2" ] || { echo "$2 is missing: the host was not prepared (Host.prepare)" >&2; exit 3; }
setsid nohup bash "$2" "$1" "$3" </dev/null >>"$5" 2>&1 &
echo $! > "$4.tmp" && mv -f "$4.tmp" "$4"
echo started
"""

# $1 workdir, $2 "download" (the URL on stdin) or "local" (the archive is already at $3), $3 the
# archive, $4 the sync's stamp file. Only relative files and directories are extracted, into
# outputs/; the stamp keeps the sync from sending the same checkpoint back. Prints latest.json.
# Exit status: 31 download failed; 32 not a tar; 33 refused archive; 34 extraction failed.
_RESTORE_SCRIPT = r"""
set -u
cd "$1" || exit 30
tarball=$3
mkdir -p run outputs
if [ "$2" = download ]; then
  url=
  IFS= read -r url || [ -n "$url" ] || { echo "no URL on stdin" >&2; exit 31; }
  rm -f "$tarball.partial"
  if ! printf 'url = "%s"\n' "$url" | curl -K - -fsS --retry 3 --retry-delay 2 --connect-timeout 30 \
      -o "$tarball.partial"; then
    rm -f "$tarball.partial"
    echo "download failed" >&2
    exit 31
  fi
  mv -f "$tarball.partial" "$tarball"
fi
trap 'rm -f "$tarball" run/ckpt-restore.err' EXIT
# -P lists names as stored: GNU tar would otherwise strip a leading "/" or "../" from the listing.
names=$(LC_ALL=C tar -tPf "$tarball" 2>run/ckpt-restore.err) \
  || { echo "not a tar archive: $(tail -1 run/ckpt-restore.err)" >&2; exit 32; }
types=$(LC_ALL=C tar -tvPf "$tarball" 2>/dev/null | cut -c1 | sort -u | tr -d '\n')
case "$types" in
  *[!d-]*) echo "it holds links or special files; only files and directories are restored" >&2; exit 33 ;;
esac
while IFS= read -r name; do
  case "$name" in
    /*|..|../*|*/..|*/../*|*\\*) echo "member $name escapes outputs/" >&2; exit 33 ;;
  esac
done <<< "$names"
if ! printf '%s\n' "$names" | grep -qx 'checkpoints/latest.json'; then
  echo "it has no checkpoints/latest.json" >&2
  exit 33
fi
tar -xf "$tarball" -C outputs --no-same-owner --no-same-permissions || { echo "extraction failed" >&2; exit 34; }
stat -c '%.9Y %s %i' outputs/checkpoints/latest.json > "$4"
cat outputs/checkpoints/latest.json
"""


def _presign(client: Any, method: str, dest: Location, expiry_seconds: int) -> str:
    expires = max(1, min(int(expiry_seconds), MAX_PRESIGN_SECONDS))
    try:
        return str(
            client.generate_presigned_url(method, Params={"Bucket": dest.bucket, "Key": dest.path}, ExpiresIn=expires)
        )
    except Exception as err:  # botocore: bad credentials or region; its message names no secret
        raise StorageError(f"could not presign {method} of {dest.uri}: {err}") from err


def start_checkpoint_sync(
    host: Host,
    job_outputs_uri: str,
    *,
    expiry_seconds: int,
    interval_seconds: float = 10.0,
    aws_conn_id: str = AWS_CONN_ID,
) -> bool:
    """Keep the host's latest checkpoint at ``<job_outputs_uri>/checkpoints/latest.tar`` while
    the trainer runs (include/remote/sync_checkpoints.sh, detached); False when it cannot be.

    ``s3://``: the host PUTs to one presigned URL (``expiry_seconds``, at most 7 days), kept in
    a 0600 file. ``file://``: only a local host, which copies into it. Calling it again while the
    sync runs starts nothing (the URL is refreshed). The host must have been prepared.
    """
    dest = parse_uri(job_outputs_uri).child(CHECKPOINT_ARCHIVE)
    if dest.scheme == "s3":
        target = _presign(_s3_hook(aws_conn_id).get_conn(), "put_object", dest, expiry_seconds)
    elif not host.remote:
        target = str(Path(dest.path).absolute())
    else:
        log.warning(
            "checkpoints are not synced: outputs_uri %s is not s3:// and the instance cannot reach "
            "this worker's files; a recovered job restarts from scratch",
            job_outputs_uri,
        )
        return False
    # The URL carries a signature: it goes on stdin into a private file, never on a command line.
    host.script(_WRITE_PRIVATE_SCRIPT, host.workdir, CHECKPOINT_SYNC_URL, stdin=f"{target}\n".encode())
    rc, out, err = host.script(
        _START_SYNC_SCRIPT,
        host.workdir,
        host.remote_script(SYNC_CHECKPOINTS_SCRIPT),
        f"{max(0.1, float(interval_seconds)):.3f}",
        CHECKPOINT_SYNC_PID,
        CHECKPOINT_SYNC_LOG,
        check=False,
    )
    if rc != 0:
        raise HostError(f"could not start the checkpoint sync in {host.workdir}: {err.strip()[-1000:]}")
    log.info("checkpoint sync %s: %s every %gs", out.strip() or "started", dest.uri, interval_seconds)
    return True


def restore_checkpoint(
    host: Host, job_outputs_uri: str, *, expiry_seconds: int, aws_conn_id: str = AWS_CONN_ID
) -> dict[str, Any] | None:
    """Put the checkpoint kept at ``<job_outputs_uri>/checkpoints/latest.tar`` into the host's
    ``outputs/`` before the trainer starts; returns its ``latest.json``, or None if there is none.

    ``s3://`` and a remote host: the instance downloads it from a presigned GET URL itself;
    otherwise it goes through this worker. Absolute, ``..`` and link members are refused.
    """
    src = parse_uri(job_outputs_uri).child(CHECKPOINT_ARCHIVE)
    if src.scheme == "s3":
        from botocore.exceptions import ClientError

        client = _s3_hook(aws_conn_id).get_conn()
        try:
            client.head_object(Bucket=src.bucket, Key=src.path)
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise StorageError(f"could not look for a checkpoint at {src.uri}: {err}") from err
        if host.remote:
            rc, out, err_text = host.script(
                _RESTORE_SCRIPT,
                host.workdir,
                "download",
                _RESTORE_TAR,
                CHECKPOINT_SYNC_STAMP,
                stdin=f"{_presign(client, 'get_object', src, expiry_seconds)}\n".encode(),
                timeout=24 * 3600,
                check=False,
            )
        else:
            with tempfile.TemporaryDirectory(prefix="gpu-checkpoint-") as tmp:
                local = Path(tmp) / "latest.tar"
                try:
                    client.download_file(src.bucket, src.path, str(local))
                except Exception as err:
                    raise TransferError(f"could not download the checkpoint {src.uri}: {err}") from err
                rc, out, err_text = _restore_from_file(host, local)
    else:
        if not Path(src.path).is_file():
            return None
        rc, out, err_text = _restore_from_file(host, Path(src.path))
    if rc == 31:
        raise TransferError(f"the instance could not download the checkpoint {src.uri}: {err_text.strip()[-1000:]}")
    if rc != 0:
        raise StorageError(f"refusing the checkpoint {src.uri}: {err_text.strip()[-1000:] or f'exit status {rc}'}")
    try:
        pointer = json.loads(out)
    except ValueError as err:
        raise StorageError(f"the checkpoint {src.uri} holds an unreadable {CHECKPOINT_POINTER}: {err}") from err
    if not isinstance(pointer, dict):
        raise StorageError(f"the checkpoint {src.uri}: {CHECKPOINT_POINTER} is not a JSON object")
    present = {f.path for f in host.list_files(OUTPUT_DIR)}
    missing = [p for p in checkpoint_files(pointer) if _safe_relpath(p) not in present]
    if missing:
        # A pointer to absent files would crash the trainer's resume: without it, it starts afresh.
        host.script('rm -f -- "$1"', host.path(f"{OUTPUT_DIR}/{CHECKPOINT_POINTER}"), check=False)
        raise StorageError(f"the checkpoint {src.uri} is incomplete: {', '.join(missing)} named but not in it")
    log.info("restored the checkpoint %s into %s", src.uri, host.path(OUTPUT_DIR))
    return pointer


def _restore_from_file(host: Host, archive: Path) -> tuple[int, str, str]:
    host.put_file(archive, _RESTORE_TAR)
    return host.script(
        _RESTORE_SCRIPT, host.workdir, "local", _RESTORE_TAR, CHECKPOINT_SYNC_STAMP, timeout=3600, check=False
    )


def checkpoint_files(pointer: Any) -> list[str]:
    """The files a checkpoint pointer names: every string field ending in ``_path``, at any depth
    (the contract include/remote/sync_checkpoints.sh documents), relative to ``outputs/``."""
    found: list[str] = []
    if isinstance(pointer, dict):
        for key, value in pointer.items():
            if isinstance(value, str) and str(key).endswith("_path"):
                found.append(value)
            else:
                found.extend(checkpoint_files(value))
    elif isinstance(pointer, list):
        for item in pointer:
            found.extend(checkpoint_files(item))
    return found
