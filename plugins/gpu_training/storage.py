"""Datasets in and outputs out: ``file://`` and ``s3://`` storage, every file checksummed.

S3 goes through the amazon provider's ``S3Hook`` (connection ``aws_default``; its extra
``endpoint_url`` points it at MinIO or a test server). Outputs of a job go to
``<outputs_uri>/<job uuid>/`` with a ``MANIFEST.sha256`` (``sha256sum -c`` format) written last.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from gpu_training.errors import StorageError, TransferError
from gpu_training.hosts.base import DATA_DIR, LOG_PATH, OUTPUT_DIR, Host, sha256_file
from gpu_training.results.store import ArtifactRecord

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


def _s3_hook() -> Any:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id=AWS_CONN_ID)


def _safe_relpath(relpath: str) -> str:
    parts = Path(relpath).parts
    if Path(relpath).is_absolute() or ".." in parts or not parts:
        raise StorageError(f"refusing path {relpath!r}: it escapes its directory")
    return Path(*parts).as_posix()


# --- datasets -----------------------------------------------------------------------------------


def fetch_dataset(dataset_uri: str, host: Host) -> list[tuple[str, int, str]]:
    """Copy the dataset into the host's ``data/`` directory; returns ``(relpath, size, sha256)``."""
    loc = parse_uri(dataset_uri)
    is_prefix = dataset_uri.endswith("/")
    copied: list[tuple[str, int, str]] = []
    if loc.scheme == "file":
        src = Path(loc.path)
        if src.is_dir():
            for rf in sorted(p for p in src.rglob("*") if p.is_file()):
                rel = rf.relative_to(src).as_posix()
                copied.append((f"{DATA_DIR}/{rel}", rf.stat().st_size, host.put_file(rf, f"{DATA_DIR}/{rel}")))
        elif src.is_file():
            copied.append((f"{DATA_DIR}/{src.name}", src.stat().st_size, host.put_file(src, f"{DATA_DIR}/{src.name}")))
        else:
            raise StorageError(f"dataset {dataset_uri} does not exist")
        return copied
    hook = _s3_hook()
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
                copied.append((f"{DATA_DIR}/{rel}", local.stat().st_size, host.put_file(local, f"{DATA_DIR}/{rel}")))
    except StorageError:
        raise
    except Exception as err:  # botocore errors carry the bucket/key; keep their message
        raise StorageError(f"could not read dataset {dataset_uri}: {err}") from err
    return copied


# --- outputs ------------------------------------------------------------------------------------


def _put(local: Path, dest: Location, sha256: str) -> None:
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
    hook = _s3_hook()
    hook.load_file(str(local), dest.path, bucket_name=dest.bucket, replace=True)
    head = hook.head_object(dest.path, bucket_name=dest.bucket)
    if head is None or int(head.get("ContentLength", -1)) != size:
        raise TransferError(f"{dest.uri}: uploaded size does not match the local {size} bytes")


def upload_outputs(host: Host, outputs_uri: str, job_uuid: str) -> list[ArtifactRecord]:
    """Upload the trainer's outputs and log; every file hashed, manifest last."""
    root = parse_uri(job_outputs_uri(outputs_uri, job_uuid))
    sources = [(f"{OUTPUT_DIR}/{f.path}", _safe_relpath(f.path)) for f in host.list_files(OUTPUT_DIR)]
    if host.read_chunk(LOG_PATH, 0, 1) is not None:
        sources.append((LOG_PATH, "logs/trainer.log"))
    records: list[ArtifactRecord] = []
    with tempfile.TemporaryDirectory(prefix="gpu-outputs-") as tmp:
        for remote_rel, name in sources:
            if name == MANIFEST_NAME:
                continue
            local = Path(tmp) / name
            digest = host.fetch_file(remote_rel, local)
            dest = root.child(name)
            _put(local, dest, digest)
            records.append(ArtifactRecord(name=name, uri=dest.uri, size_bytes=local.stat().st_size, sha256=digest))
            local.unlink()
        manifest = Path(tmp) / MANIFEST_NAME
        manifest.write_text("".join(f"{r.sha256}  {r.name}\n" for r in records))
        digest = sha256_file(manifest)
        _put(manifest, root.child(MANIFEST_NAME), digest)
        records.append(
            ArtifactRecord(
                name=MANIFEST_NAME,
                uri=root.child(MANIFEST_NAME).uri,
                size_bytes=manifest.stat().st_size,
                sha256=digest,
            )
        )
    return records
