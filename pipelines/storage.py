"""Where a run reads and writes: a local folder or s3://bucket/prefix, behind one small interface.

Parquet goes through pyarrow's filesystem; listing and reading videos through boto3 (endpoint URL
configurable for S3-compatible stores; credentials always from the standard AWS chain, never logged).
A storage fault while reading a video (a reset, a timeout, throttling, a body cut short) is retried and
then raised as `ReadFailed`: the infrastructure's fault, never the video's, so callers leave it uncommitted.
"""

from __future__ import annotations

import io
import os
import posixpath
import random
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from slowfast.video.decode import MISSING_FILE, VideoDecodeError

from .errors import PipelineError

# A body read cut short is not retried by botocore (only the call that starts it is): VideoSource retries it,
# S3Options.max_attempts tries in all, with exponential backoff and full jitter between them.
BACKOFF_S = 0.2
BACKOFF_MAX_S = 5.0
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}


class StorageError(PipelineError, RuntimeError):
    """A storage location that cannot be used: names it and says what to check."""


class ReadFailed(StorageError):
    """A video's bytes could not be read after the retries: the storage's fault (a reset, a timeout, throttling,
    a body cut short, credentials), not the video's. Never committed: the next run reads it again."""

    def __init__(self, uri: str, detail: str):
        self.uri, self.detail = uri, detail
        super().__init__(f"{uri}: not read ({detail}); a storage fault, not the video's: the next run reads it again")


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise StorageError(f"{uri}: expected s3://bucket/prefix")
    return parsed.netloc, parsed.path.lstrip("/").rstrip("/")


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 5  # per call, botocore's standard retry mode (throttling, 5xx, resets, timeouts)


def s3_options(section) -> S3Options:
    """The S3Options of a config's `s3:` section (pipelines.config.S3Section)."""
    return S3Options(section.endpoint_url, section.region, section.max_attempts)


def _boto3_client(opts: S3Options):
    import boto3  # imported lazily: plain local runs never need it
    from botocore.config import Config

    retries = Config(
        retries={"mode": "standard", "max_attempts": opts.max_attempts}, connect_timeout=10, read_timeout=60
    )
    return boto3.client("s3", endpoint_url=opts.endpoint_url, region_name=opts.region, config=retries)


def backoff_s(attempt: int) -> float:
    """Seconds to wait before try `attempt + 1`: exponential with full jitter (attempt counts from 1)."""
    return random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_S * 2**attempt))


class Storage:
    """A root folder, local or on S3. Paths given to methods are relative to the root, '/'-separated.

    Picklable (Ray ships it to workers): clients are created on first use in each process.
    """

    def __init__(self, root: str, s3: S3Options | None = None):
        self.root = str(root).rstrip("/")
        self.s3 = s3 or S3Options()
        self._fs = None

    def __getstate__(self):
        return {"root": self.root, "s3": self.s3, "_fs": None}

    @property
    def is_s3(self) -> bool:
        return is_s3(self.root)

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            if self.is_s3:
                kwargs = {"region": self.s3.region} if self.s3.region else {}
                kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=self.s3.max_attempts)
                if self.s3.endpoint_url:
                    parsed = urlparse(self.s3.endpoint_url)
                    kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
                self._fs = pafs.S3FileSystem(**kwargs)
            else:
                self._fs = pafs.LocalFileSystem()
        return self._fs

    def path(self, *parts: str) -> str:
        """The path pyarrow's filesystem takes (bucket/key on S3, an absolute path locally)."""
        base = "/".join(split_s3(self.root)) if self.is_s3 else str(Path(self.root).resolve())
        return posixpath.join(base, *[p.strip("/") for p in parts if p])

    def uri(self, *parts: str) -> str:
        """The location as a user writes it: s3://... or a local path."""
        return posixpath.join(self.root, *[p.strip("/") for p in parts if p])

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """Any location, not only under the root: a local path, or s3:// with this storage's S3 options."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            fs = self.fs if self.is_s3 else Storage(f"s3://{bucket}", self.s3).fs
            return fs, posixpath.join(bucket, key)
        return pafs.LocalFileSystem(), str(Path(uri).resolve())

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write atomically: readers see the old object or the whole new one, never a part."""
        target = self.path(rel)
        if self.is_s3:
            with self.fs.open_output_stream(target) as out:  # one PUT: atomic on S3
                out.write(data)
            return target
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
        return target

    def create_bytes(self, rel: str, data: bytes) -> bool:
        """Write `data` whole at rel unless something is there already; False when it is (another writer won).
        Locally the file is linked into place, which fails if the name exists; on S3 a conditional PUT
        (If-None-Match: *), which only one of two writers gets (StorageError when the store answers otherwise)."""
        if self.is_s3:
            from botocore.exceptions import ClientError

            bucket, prefix = split_s3(self.root)
            try:
                _boto3_client(self.s3).put_object(
                    Bucket=bucket, Key=posixpath.join(prefix, rel), Body=data, IfNoneMatch="*"
                )
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                    return False  # 412: it exists; 409: another conditional write of it is under way
                raise StorageError(f"{self.uri(rel)}: cannot write ({exc})") from exc
            return True
        target = self.path(rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.link(tmp, target)  # no reader ever sees a part-written file
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def list(self, rel: str, suffix: str = "") -> list[str]:
        """Files under rel (recursively), as paths relative to the root, sorted."""
        base = self.path(rel)
        info = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        root = self.path()
        return sorted(
            posixpath.relpath(i.path, root)
            for i in info
            if i.type == pafs.FileType.File
            and i.path.endswith(suffix)
            and not posixpath.basename(i.path).startswith(".tmp-")
        )

    def delete(self, rel: str) -> None:
        self.fs.delete_file(self.path(rel))

    def makedirs(self, rel: str) -> None:
        if not self.is_s3:
            os.makedirs(self.path(rel), exist_ok=True)

    def check_writable(self, what: str = "storage_root") -> None:
        """Fail before any work starts when the root cannot be written; `what` names the setting."""
        probe = f".probe-{uuid.uuid4().hex}"
        try:
            self.write_bytes(probe, b"ok")
            self.delete(probe)
        except Exception as exc:  # noqa: BLE001 - re-raised with the location and the fix
            hint = (
                "check the bucket exists, s3.endpoint_url, and AWS credentials (standard chain)"
                if self.is_s3
                else "check the folder's permissions and free space"
            )
            raise StorageError(f"{what} {self.root}: not writable ({type(exc).__name__}: {exc}); {hint}") from exc


@dataclass(frozen=True)
class SourceFile:
    """A video as listed: where it is (relative to the video root), its size and a change token."""

    rel: str
    size: int
    etag: str


class VideoSource:
    """Videos under a local folder or an s3:// prefix: list them, and open one for decoding."""

    def __init__(self, root: str, s3: S3Options | None = None):
        self.root = str(root).rstrip("/")
        self.s3 = s3 or S3Options()
        self._client = None

    def __getstate__(self):
        return {"root": self.root, "s3": self.s3, "_client": None}

    @property
    def is_s3(self) -> bool:
        return is_s3(self.root)

    @property
    def client(self):
        if self._client is None:
            self._client = _boto3_client(self.s3)
        return self._client

    def list(self) -> dict[str, SourceFile]:
        if self.is_s3:
            return self._list_s3()
        root = Path(self.root)
        if not root.is_dir():
            raise StorageError(f"video_root {self.root}: not a folder; set data.video_root to where the videos are")
        files = {}
        for path in root.rglob("*"):
            if path.is_file():
                st = path.stat()
                rel = path.relative_to(root).as_posix()
                files[rel] = SourceFile(rel, st.st_size, f"{st.st_size}-{st.st_mtime_ns}")
        return files

    def _list_s3(self) -> dict[str, SourceFile]:
        bucket, prefix = split_s3(self.root)
        files = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix) + 1 :] if prefix else obj["Key"]
                    files[rel] = SourceFile(rel, obj["Size"], obj["ETag"].strip('"'))
        except Exception as exc:  # noqa: BLE001 - botocore raises many types; all mean "cannot list"
            raise StorageError(
                f"video_root {self.root}: cannot list ({type(exc).__name__}: {exc}); "
                "check the bucket, s3.endpoint_url and AWS credentials"
            ) from exc
        return files

    def open(self, rel: str):
        """A path (local) or an in-memory file (S3) that PyAV can open. A file that is not there is the
        video's fault (`VideoDecodeError` missing_file); a storage fault, retried first, is `ReadFailed`."""
        if not self.is_s3:
            path = os.path.join(self.root, rel)
            try:
                os.stat(path)
            except FileNotFoundError:
                raise VideoDecodeError(rel, MISSING_FILE, hint="check the path in the annotations") from None
            except OSError as exc:  # a stale NFS handle, an I/O error: the filesystem's fault
                raise ReadFailed(self.uri(rel), f"{type(exc).__name__}: {exc}") from exc
            return path
        bucket, prefix = split_s3(self.root)
        key = f"{prefix}/{rel}" if prefix else rel
        return io.BytesIO(self._get(bucket, key, self.uri(rel)))

    def _get(self, bucket: str, key: str, uri: str) -> bytes:
        """The object's bytes. botocore retries the GET itself; a body cut short is retried here."""
        from botocore.exceptions import BotoCoreError, ClientError

        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.client.get_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in _NOT_FOUND:
                    raise VideoDecodeError(uri, MISSING_FILE, "no such object", "check the video root") from None
                raise ReadFailed(uri, f"{code or type(exc).__name__}: {exc}") from exc
            except BotoCoreError as exc:  # no connection, timeouts: botocore's retries are spent
                raise ReadFailed(uri, f"{type(exc).__name__}: {exc}") from exc
            try:
                return response["Body"].read()  # botocore checks the length against Content-Length
            except (BotoCoreError, OSError) as exc:  # cut mid-body (IncompleteRead, reset, timeout)
                if attempt >= self.s3.max_attempts:
                    raise ReadFailed(uri, f"{type(exc).__name__} reading the body, {attempt} tries: {exc}") from exc
                time.sleep(backoff_s(attempt))

    def uri(self, rel: str) -> str:
        return posixpath.join(self.root, rel)
