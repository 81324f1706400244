"""Where corpora, gold and outputs live: a local path, or an object-store URI (s3://, gs://, az://, hf://).

A URI is held as a `Remote` (pathlib would fold its '//' into one slash) and read and written through its
fsspec filesystem (s3fs, gcsfs, adlfs, huggingface_hub: the `storage` extra), which takes credentials and
endpoint from the standard environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS,
AZURE_STORAGE_*, HF_TOKEN, ...). Local paths stay `Path` and keep their own code paths (append, fsync,
rename). Every store error becomes one StorageError line that names the URI and what to check.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from extractor.errors import ExtractorError

# scheme -> (fsspec protocol, the package that implements it)
SCHEMES = {"s3": ("s3", "s3fs"), "gs": ("gs", "gcsfs"), "gcs": ("gs", "gcsfs"), "az": ("az", "adlfs"),
           "abfs": ("az", "adlfs"), "abfss": ("az", "adlfs"), "hf": ("hf", "huggingface_hub")}
CREDENTIALS = {"s3": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a non-AWS store)",
               "gs": "GOOGLE_APPLICATION_CREDENTIALS", "az": "AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY "
               "or AZURE_STORAGE_CONNECTION_STRING", "hf": "HF_TOKEN"}
ENDPOINTS = {"s3": " (AWS_ENDPOINT_URL for S3-compatible stores)", "hf": " (HF_ENDPOINT, HF_HUB_OFFLINE)"}
# What a process on another machine (a Ray worker) needs to reach the same store as this one.
ENV_PREFIXES = ("AWS_", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "AZURE_STORAGE_", "HF_TOKEN",
                "HF_ENDPOINT")
NO_BUCKET = "the specified bucket does not exist"  # as S3 says it; error() keys on it
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(ExtractorError):
    """An object store refused or failed a read or a write."""


@dataclass(frozen=True)
class Remote:
    """An object-store URI with the few pathlib-like parts the project uses (name, suffix, with_name)."""

    uri: str

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0].lower()

    @property
    def protocol(self) -> str:
        return SCHEMES[self.scheme][0]

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def suffixes(self) -> list[str]:
        return PurePosixPath(self.name).suffixes

    def with_name(self, name: str) -> "Remote":
        return Remote(self.uri.rstrip("/").rsplit("/", 1)[0] + "/" + name)

    def child(self, name: str) -> "Remote":
        return Remote(self.uri.rstrip("/") + "/" + name)

    @property
    def bucket(self) -> str:
        return self.uri.split("://", 1)[1].split("/", 1)[0]

    def __str__(self) -> str:
        return self.uri


Location = Path | Remote


def target(value) -> Location:
    """A command-line path or URI as a Path (local, file://) or a Remote (a known object-store scheme)."""
    if isinstance(value, (Path, Remote)):
        return value
    text = str(value)
    match = _URI.match(text)
    if not match:
        return Path(text)
    scheme = match.group(1).lower()
    if scheme == "file":
        return Path(text[len("file://"):])
    if scheme not in SCHEMES:
        raise StorageError(f"{text}: unknown storage scheme '{scheme}://'; use a local path or an s3://, gs://, "
                           "az:// or hf:// URI")
    if not text.split("://", 1)[1].strip("/"):
        raise StorageError(f"{text}: the URI names no bucket or object")
    return Remote(text)


def is_remote(location) -> bool:
    return isinstance(location, Remote)


_FILESYSTEMS: dict = {}


def filesystem(remote: Remote):
    """The fsspec filesystem for a URI's scheme. One per scheme and store settings: a filesystem reads the
    environment once, when made, so a change of credentials (or endpoint) must make a new one."""
    protocol, package = SCHEMES[remote.scheme]
    key = (protocol, tuple(sorted(forwarded_env().items())))
    if key not in _FILESYSTEMS:
        try:
            import fsspec
            _FILESYSTEMS[key] = fsspec.filesystem(protocol, skip_instance_cache=True)
        except ImportError:
            raise StorageError(f"{remote}: {remote.scheme}:// needs the {package} package: "
                               "pip install 'extractor[storage]'") from None
    return _FILESYSTEMS[key]


def forwarded_env() -> dict[str, str]:
    """This process's store settings and credentials, for workers started elsewhere (Ray)."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def error(location: Remote, exc: BaseException, doing: str) -> StorageError:
    """One line for a store failure: a missing object or bucket, refused credentials, or an unreachable store."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    if isinstance(exc, FileNotFoundError):
        if NO_BUCKET in first.lower() or "container" in first.lower():
            return StorageError(f"cannot {doing} {location}: bucket '{location.bucket}' does not exist ({first}); "
                                "create it or fix the URI")
        return StorageError(f"cannot {doing} {location}: no such object; check the URI")
    if isinstance(exc, PermissionError):
        creds = CREDENTIALS.get(location.protocol, "the store's credentials")
        return StorageError(f"cannot {doing} {location}: access denied ({first}); check the credentials "
                            f"({creds}) and the bucket's permissions")
    endpoint = ENDPOINTS.get(location.protocol, "")
    return StorageError(f"cannot {doing} {location}: {type(exc).__name__}: {first}; check the endpoint"
                        f"{endpoint}, the network and the URI")


@contextlib.contextmanager
def translated(location: Remote, doing: str):
    """Every filesystem library raises its own types (botocore, google-auth, azure-core, huggingface_hub):
    whatever a store call raises becomes one StorageError line."""
    try:
        yield
    except ExtractorError:
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise error(location, exc, doing) from None


def exists(location: Location) -> bool:
    """True when the file or object is there; a store that refuses to say raises (credentials, bucket)."""
    if not is_remote(location):
        return location.exists()
    return _info(location) is not None


def is_file(location: Location) -> bool:
    if not is_remote(location):
        return location.is_file()
    info = _info(location)
    return info is not None and info.get("type") == "file"


def _info(location: Remote) -> dict | None:
    """The object's metadata, None when it is absent; a missing bucket is an error, not an absence."""
    fs = filesystem(location)
    with translated(location, "read"):
        try:
            return fs.info(location.uri)
        except FileNotFoundError:
            if _bucket_missing(fs, location):
                raise FileNotFoundError(NO_BUCKET) from None
            return None


def _bucket_missing(fs, location: Remote) -> bool:
    if location.protocol == "hf":  # hf://datasets/... has no bucket of its own
        return False
    try:
        fs.info(location.bucket)
        return False
    except FileNotFoundError:
        return True


def fingerprint(location: Remote) -> dict:
    """What the store says about an object without reading it: size and, where it keeps one, its ETag or
    checksum (a run key's corpus identity)."""
    info = _info(location)
    if info is None:
        raise StorageError(f"cannot read {location}: no such object; check the URI")
    found = {"uri": location.uri, "size": info.get("size")}
    for key in ("ETag", "etag", "md5Hash", "crc32c", "content_md5", "sha256", "blob_id"):
        value = info.get(key)
        if isinstance(value, (str, int)) and value:
            found[key.lower()] = str(value).strip('"')
            break
    return found


def open_read(location: Location):
    """A binary file object; for a URI, reads stream in blocks (memory flat for any size)."""
    if not is_remote(location):
        return open(location, "rb")
    fs = filesystem(location)
    with translated(location, "read"):
        return fs.open(location.uri, "rb")


def read_text(location: Location) -> str:
    """The whole text; FileNotFoundError when it is absent (callers tell absent from broken)."""
    if not is_remote(location):
        return location.read_text(encoding="utf-8")
    fs = filesystem(location)
    with translated(location, "read"):
        try:
            return fs.cat_file(location.uri).decode("utf-8")
        except FileNotFoundError:
            if _bucket_missing(fs, location):
                raise FileNotFoundError(NO_BUCKET) from None
    raise FileNotFoundError(location.uri)


def put(location: Remote, data: bytes) -> None:
    """One object in one request: a reader sees all of it or none of it."""
    fs = filesystem(location)
    with translated(location, "write"):
        fs.pipe_file(location.uri, data)


@contextlib.contextmanager
def atomic_writer(location: Location):
    """A binary file that appears whole at the end, or not at all: a local temporary file renamed into place,
    or an upload completed only on success (an object store shows a multipart upload only once completed)."""
    if not is_remote(location):
        tmp = location.with_name(location.name + ".tmp")
        try:
            with open(tmp, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())  # durable before it replaces the old file
            os.replace(tmp, location)
        finally:
            tmp.unlink(missing_ok=True)
        return
    fs = filesystem(location)
    with translated(location, "write"):
        fh = fs.open(location.uri, "wb")
    try:
        yield fh
    except BaseException:
        with contextlib.suppress(Exception):  # nothing to keep; the error that got here is the one to report
            fh.discard()
        raise
    with translated(location, "write"):
        fh.close()


def remove(location: Location) -> None:
    """Delete if present."""
    if not is_remote(location):
        location.unlink(missing_ok=True)
        return
    fs = filesystem(location)
    with translated(location, "delete"):
        try:
            fs.rm_file(location.uri)
        except FileNotFoundError:
            pass


def listing(folder: Remote) -> list[Remote]:
    """The objects under a folder URI, fresh from the store (not from fsspec's listing cache)."""
    fs = filesystem(folder)
    with translated(folder, "list"):
        fs.invalidate_cache(folder.uri)
        try:
            names = fs.find(folder.uri)
        except FileNotFoundError:
            return []
    return [folder.child(n.rstrip("/").rsplit("/", 1)[-1]) for n in names]


def check_writable(location: Remote) -> None:
    """Fail before loading a model when the output cannot be written (bucket, credentials, endpoint)."""
    probe = location.with_name(f".{location.name}.probe")
    put(probe, b"")
    remove(probe)
