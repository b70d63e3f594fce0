"""Where a store lives: a local folder (:class:`pathlib.Path`) or an object-store URI (:class:`RemotePath`).

``s3://bucket/prefix`` (AWS S3 or any S3-compatible server: MinIO, Ceph, moto) is a store location like a
folder. :func:`store_location` turns what a user gave (a path, a URI, or either already parsed) into one
of the two; the store's modules then use the small part of the ``pathlib`` interface that
:class:`RemotePath` also has (``/``, ``name``, ``exists``, ``is_dir``, ``iterdir``, ``read_bytes``,
``write_bytes``, ``unlink``...), and hand Lance the URI with :func:`lance_options`.

Connection settings come from the standard environment variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``,
``AWS_ALLOW_HTTP=true`` for a plain-http server), read by each process where it runs (every Ray
node needs them, or an instance role), overridden by explicit ``storage_options``
(``--storage-option KEY=VALUE``), which travel with the location to Ray's workers. The three clients
(Arrow's S3 file system for the store's small files, Lance for its tables, boto3 for the conditional
puts of the writer lease) get the same settings, with short timeouts, so an unreachable endpoint fails
in seconds with one line instead of hanging.

Example
-------
>>> store_location("runs/store")
PosixPath('runs/store')
>>> loc = store_location("s3://bucket/stores/s1", {"endpoint": "http://127.0.0.1:9000", "allow_http": "true"})
>>> str(loc / "manifest.json"), loc.name
('s3://bucket/stores/s1/manifest.json', 's1')
>>> parse_storage_options(["region=eu-west-1", "AWS_ALLOW_HTTP=true"])
{'region': 'eu-west-1', 'allow_http': 'true'}
>>> parse_storage_options(["colour=blue"])
Traceback (most recent call last):
...
forvalue.schemas.errors.ConfigError: storage_options: unknown key 'colour'; ...
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from forvalue.schemas.errors import ConfigError, StoreError

SCHEMES = ("s3",)
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")

# canonical option key -> (environment variables, in order of precedence)
OPTION_ENV = {
    "access_key_id": ("AWS_ACCESS_KEY_ID",),
    "secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "session_token": ("AWS_SESSION_TOKEN",),
    "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "endpoint": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"),
    "allow_http": ("AWS_ALLOW_HTTP",),
    "connect_timeout": (),
    "request_timeout": (),
}
_ALIASES = {"endpoint_url": "endpoint", "default_region": "region", "timeout": "request_timeout"}
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0


def is_uri(path) -> bool:
    """True for a :class:`RemotePath` or a string of the form ``scheme://...``."""
    return isinstance(path, RemotePath) or (isinstance(path, str) and _URI.match(path) is not None)


def parse_storage_options(pairs: Iterable[str] | Mapping[str, str] | None) -> dict[str, str]:
    """``KEY=VALUE`` strings (or a mapping) checked and keyed by their canonical names (:data:`OPTION_ENV`).

    Keys are case-insensitive, with or without the ``aws_`` prefix (``AWS_REGION``, ``aws_region`` and
    ``region`` are one key); an unknown key or a pair without ``=`` is a one-line :class:`ConfigError`.
    """
    if not pairs:
        return {}
    items = list(pairs.items()) if isinstance(pairs, Mapping) else []
    if not isinstance(pairs, Mapping):
        for pair in pairs:
            key, sep, value = str(pair).partition("=")
            if not sep or not key.strip():
                raise ConfigError("storage_options", f"{pair!r} is not KEY=VALUE (e.g. region=eu-west-1)")
            items.append((key, value))
    out: dict[str, str] = {}
    for key, value in items:
        name = str(key).strip().lower()
        name = name[4:] if name.startswith("aws_") else name
        name = _ALIASES.get(name, name)
        if name not in OPTION_ENV:
            raise ConfigError(
                "storage_options",
                f"unknown key {key!r}; use one of {', '.join(OPTION_ENV)} (AWS_ prefix optional)",
            )
        out[name] = str(value).strip()
    return out


def store_location(path, storage_options: Iterable[str] | Mapping[str, str] | None = None) -> "Path | RemotePath":
    """A local :class:`~pathlib.Path`, or a :class:`RemotePath` for ``s3://`` (``storage_options`` added to its own).

    Another scheme (``gs://``, ``az://``, ``http://``...) is a one-line :class:`StoreError`.
    """
    options = parse_storage_options(storage_options)
    if isinstance(path, RemotePath):
        return RemotePath(path.uri, {**path.options, **options}) if options else path
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    match = _URI.match(text)
    if match is None:
        if options:
            raise ConfigError("storage_options", f"{text}: storage options are for object-store URIs (s3://...)")
        local = Path(text)
        if not local.is_absolute() and local.parts and ":" in local.parts[0]:
            return local.absolute()  # Lance reads a relative 'run:1' as the URI scheme 'run'
        return local
    scheme = match.group(1).lower()
    if scheme not in SCHEMES:
        raise StoreError(
            f"{text}: '{scheme}://' stores are not supported; use s3:// (AWS S3 or an S3-compatible server) "
            "or a local folder"
        )
    return RemotePath(text, options)


def check_store_name(path) -> None:
    """Refuse a local store path that Lance cannot make a table below (a control character such as a line
    break or tab, or a byte that is not UTF-8): one-line :class:`StoreError`, before anything is written."""
    if isinstance(path, RemotePath) or is_uri(path):
        return
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    bad = next((c for c in text if ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF), None)
    if bad is not None:
        what = "a byte that is not UTF-8" if ord(bad) >= 0xD800 else f"the control character {bad!r}"
        raise StoreError(f"{text!r}: a store path with {what} cannot hold a store; choose another name")


def lance_options(path) -> dict[str, str] | None:
    """The ``storage_options`` argument of Lance for a location (None for a local folder)."""
    return path.lance_options() if isinstance(path, RemotePath) else None


def settings(options: Mapping[str, str]) -> dict[str, str]:
    """The effective connection settings: the environment of this process, then ``options``."""
    out = {}
    for key, names in OPTION_ENV.items():
        for name in names:
            if os.environ.get(name):
                out[key] = os.environ[name]
                break
    out.update({k: v for k, v in options.items() if v != ""})
    endpoint = out.get("endpoint")
    if endpoint and endpoint.lower().startswith("http://") and out.get("allow_http", "").lower() not in ("1", "true"):
        raise StoreError(
            f"the object store endpoint {endpoint} is plain http; set AWS_ALLOW_HTTP=true "
            "(or --storage-option allow_http=true) to allow it"
        )
    return out


_FILESYSTEMS: dict[tuple, object] = {}


def _timeout(conf: Mapping[str, str], key: str, default: float) -> float:
    try:
        return float(str(conf.get(key, default)).rstrip("s"))
    except ValueError:
        raise ConfigError("storage_options", f"{key}={conf[key]!r} is not a number of seconds") from None


def arrow_filesystem(options: Mapping[str, str]):
    """Arrow's S3 file system for these settings (cached per process)."""
    conf = settings(options)
    key = tuple(sorted(conf.items()))
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        import pyarrow.fs as pafs

        kwargs = {
            "region": conf.get("region") or "us-east-1",
            "connect_timeout": _timeout(conf, "connect_timeout", CONNECT_TIMEOUT_S),
            "request_timeout": _timeout(conf, "request_timeout", REQUEST_TIMEOUT_S),
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=2),
        }
        if conf.get("access_key_id") and conf.get("secret_access_key"):
            kwargs.update(access_key=conf["access_key_id"], secret_key=conf["secret_access_key"])
            if conf.get("session_token"):
                kwargs["session_token"] = conf["session_token"]
        endpoint = conf.get("endpoint")
        if endpoint:
            scheme, sep, rest = endpoint.partition("://")
            kwargs["endpoint_override"] = rest if sep else endpoint
            kwargs["scheme"] = scheme.lower() if sep else "https"
        fs = _FILESYSTEMS[key] = pafs.S3FileSystem(**kwargs)
    return fs


def boto3_client(options: Mapping[str, str]):
    """A boto3 S3 client for these settings (the writer lease's conditional puts); one line if boto3 is missing."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise StoreError(
            "writing a store on an object store needs boto3 (its writer lease uses conditional puts): "
            "pip install 'forvalue[s3]'"
        ) from None
    conf = settings(options)
    config = Config(
        connect_timeout=_timeout(conf, "connect_timeout", CONNECT_TIMEOUT_S),
        read_timeout=_timeout(conf, "request_timeout", REQUEST_TIMEOUT_S),
        retries={"max_attempts": 2, "mode": "standard"},
    )
    return boto3.client(
        "s3",
        endpoint_url=conf.get("endpoint") or None,
        aws_access_key_id=conf.get("access_key_id") or None,
        aws_secret_access_key=conf.get("secret_access_key") or None,
        aws_session_token=conf.get("session_token") or None,
        region_name=conf.get("region") or "us-east-1",
        config=config,
    )


class _Stat:
    def __init__(self, size: int):
        self.st_size = size


class RemotePath:
    """An object-store location with the part of :class:`pathlib.Path`'s interface a store uses.

    Folders are key prefixes (``is_dir`` is true when an object lies below); ``write_bytes`` is one
    PUT, which an object store makes visible whole or not at all (the atomic writer's guarantee);
    ``mkdir`` does nothing. Picklable (Ray ships it to workers): it holds the URI and the explicit
    options, not a client.
    """

    def __init__(self, uri: str, options: Mapping[str, str] | None = None):
        match = _URI.match(uri)
        if match is None:
            raise ValueError(f"not a URI: {uri}")
        self.scheme = match.group(1).lower()
        rest = re.sub("/+", "/", match.group(2)).strip("/")
        if not rest:
            raise StoreError(f"{uri}: give a bucket (and a path inside it), e.g. s3://bucket/stores/s1")
        self.bucket, _, self.key = rest.partition("/")
        if len(self.bucket) < 3:
            raise StoreError(f"{uri}: bucket names have at least 3 characters")
        self.options = dict(options or {})

    # -- names -----------------------------------------------------------------------------------
    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.bucket}" + (f"/{self.key}" if self.key else "")

    @property
    def fs_path(self) -> str:
        """``bucket/key``: the path Arrow's S3 file system takes."""
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"RemotePath('{self.uri}')"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __lt__(self, other: "RemotePath") -> bool:
        return self.uri < other.uri

    def __truediv__(self, name) -> "RemotePath":
        return RemotePath(f"{self.uri}/{str(name).strip('/')}", self.options)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1] if self.key else self.bucket

    @property
    def suffix(self) -> str:
        name = self.name
        return name[name.rfind(".") :] if "." in name.lstrip(".") else ""

    @property
    def parent(self) -> "RemotePath":
        if not self.key:
            return self
        head = self.key.rsplit("/", 1)[0] if "/" in self.key else ""
        return RemotePath(f"{self.scheme}://{self.bucket}" + (f"/{head}" if head else ""), self.options)

    @property
    def parents(self) -> list["RemotePath"]:
        out, here = [], self
        while here.key:
            here = here.parent
            out.append(here)
        return out

    def with_name(self, name: str) -> "RemotePath":
        return self.parent / name

    # -- the object store ------------------------------------------------------------------------
    @property
    def fs(self):
        return arrow_filesystem(self.options)

    def lance_options(self) -> dict[str, str]:
        """The same settings in Lance's (object_store's) key names."""
        conf = settings(self.options)
        names = {
            "access_key_id": "aws_access_key_id",
            "secret_access_key": "aws_secret_access_key",
            "session_token": "aws_session_token",
            "region": "aws_region",
            "endpoint": "aws_endpoint",
            "allow_http": "allow_http",
        }
        out = {names[k]: v for k, v in conf.items() if k in names}
        out.setdefault("aws_region", "us-east-1")
        out["connect_timeout"] = f"{_timeout(conf, 'connect_timeout', CONNECT_TIMEOUT_S):g}s"
        out["timeout"] = f"{_timeout(conf, 'request_timeout', REQUEST_TIMEOUT_S):g}s"
        out.setdefault("client_max_retries", "3")
        out.setdefault("client_retry_timeout", "30")
        return out

    def _info(self):
        return self.fs.get_file_info(self.fs_path)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def iterdir(self) -> Iterator["RemotePath"]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.fs_path, allow_not_found=True, recursive=False))
        for info in sorted(infos, key=lambda i: i.path):
            yield self / info.path.rsplit("/", 1)[-1]

    def glob(self, pattern: str) -> Iterator["RemotePath"]:
        return (p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern))

    def rglob(self, pattern: str) -> Iterator["RemotePath"]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.fs_path, allow_not_found=True, recursive=True))
        for info in infos:
            if info.type == pafs.FileType.File and fnmatch.fnmatchcase(info.path.rsplit("/", 1)[-1], pattern):
                yield _SizedPath(f"{self.scheme}://{info.path}", self.options, info.size)

    def stat(self) -> _Stat:
        import pyarrow.fs as pafs

        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(2, "no such object", str(self))
        return _Stat(int(info.size or 0))

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.fs_path) as stream:
                return stream.read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if "not found" in str(exc).lower() or "nosuchkey" in str(exc).lower():
                raise FileNotFoundError(2, "no such object", str(self)) from None
            raise

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    @property
    def suffixes(self) -> list[str]:
        name = self.name.lstrip(".")
        return ["." + part for part in name.split(".")[1:]]

    def open(self, mode: str = "rb"):
        """A buffered binary stream of the object (read, streamed: never the whole object in memory)."""
        import io

        if mode != "rb":
            raise ValueError("RemotePath.open reads only ('rb'); write with write_bytes")
        return io.BufferedReader(self.fs.open_input_stream(self.fs_path), buffer_size=1 << 20)

    def open_random_access(self):
        """A seekable Arrow file of the object (Parquet reads its footer, then the row groups it needs)."""
        return self.fs.open_input_file(self.fs_path)

    def write_bytes(self, data: bytes) -> int:
        with self.fs.open_output_stream(self.fs_path) as stream:
            stream.write(data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.fs_path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: an object store has no folders (a prefix exists once an object lies below it)."""

    def rmtree(self) -> None:
        """Delete every object below this prefix."""
        import pyarrow.fs as pafs

        for info in self.fs.get_file_info(pafs.FileSelector(self.fs_path, allow_not_found=True, recursive=True)):
            if info.type == pafs.FileType.File:
                self.fs.delete_file(info.path)

    def publish_if_absent(self, data: bytes) -> bool:
        """Create this object with ``data`` only if it does not exist (a conditional PUT, If-None-Match: *)."""
        from botocore.exceptions import ClientError

        client = boto3_client(self.options)
        try:
            client.put_object(Bucket=self.bucket, Key=self.key, Body=data, IfNoneMatch="*")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise OSError(str(exc)) from None
        return True


class _SizedPath(RemotePath):
    """A listed object whose size is known (``rglob`` answers ``stat`` without another request)."""

    def __init__(self, uri: str, options: Mapping[str, str], size: int | None):
        super().__init__(uri, options)
        self._size = int(size or 0)

    def is_file(self) -> bool:
        return True

    def stat(self) -> _Stat:
        return _Stat(self._size)


def _pattern(uri: str) -> "re.Pattern":
    """A glob over URIs as the shell reads it: ``*`` and ``?`` stay within a path part, ``**/`` crosses parts."""
    out, i = [], 0
    while i < len(uri):
        if uri.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif uri.startswith("**", i):
            out.append(".*")
            i += 2
        elif uri[i] == "*":
            out.append("[^/]*")
            i += 1
        elif uri[i] == "?":
            out.append("[^/]")
            i += 1
        elif uri[i] == "[":
            end = uri.find("]", i + 1)
            if end < 0:
                out.append(re.escape("["))
                i += 1
            else:
                body = uri[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end + 1
        else:
            out.append(re.escape(uri[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def remote_glob(pattern: str, options: Mapping[str, str] | None = None) -> list[RemotePath]:
    """The objects whose URIs match ``pattern`` (``s3://bucket/data/*.parquet``, ``**`` for any depth), sorted."""
    import pyarrow.fs as pafs

    head = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    base = store_location(head[: head.rfind("/")] if "/" in head[len("s3://") :] else head, options)
    check_reachable(base)
    scheme, rest = pattern.split("://", 1)
    regex = _pattern(f"{scheme.lower()}://{re.sub('/+', '/', rest)}")
    infos = base.fs.get_file_info(pafs.FileSelector(base.fs_path, allow_not_found=True, recursive=True))
    found = [
        _SizedPath(f"{base.scheme}://{i.path}", base.options, i.size)
        for i in infos
        if i.type == pafs.FileType.File and regex.match(f"{base.scheme}://{i.path}")
    ]
    return sorted(found)


def remove_tree(path) -> None:
    """Delete a folder or object prefix and everything below it."""
    if isinstance(path, RemotePath):
        path.rmtree()
    else:
        import shutil

        shutil.rmtree(path)


# -- one line for what goes wrong with an object store ------------------------------------------------
def describe_failure(location: RemotePath, exc: BaseException) -> str | None:
    """One line for an object-store error that is about access, not the store's content (None otherwise)."""
    text = str(exc)
    low = text.lower()
    conf = settings(location.options)
    where = conf.get("endpoint") or "AWS S3"
    if any(
        s in low
        for s in (
            "network_connection",
            "couldn't connect",
            "could not connect",
            "connection refused",
            "failed to connect",
            "curlcode",
            "timed out",
            "timeout",
            "dns error",
            "error sending request",
            "could not resolve",
            "endpoint url",
        )
    ):
        return (
            f"{location}: cannot reach the object store at {where}; check AWS_ENDPOINT_URL "
            "(or --storage-option endpoint=...) and the network"
        )
    if any(
        s in low
        for s in (
            "access_denied",
            "accessdenied",
            "access denied",
            "invalidaccesskeyid",
            "signaturedoesnotmatch",
            "forbidden",
            "403",
            "invalidtoken",
            "expiredtoken",
            "no credentials",
            "unable to locate credentials",
        )
    ):
        return (
            f"{location}: the object store at {where} denied access; check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or --storage-option) and the bucket's permissions"
        )
    if "nosuchbucket" in low or "no_such_bucket" in low or "bucket does not exist" in low or "bucket not found" in low:
        return f"{location}: no bucket '{location.bucket}' at {where}; create it first (forvalue creates no buckets)"
    return None


_REACHED: set[tuple] = set()


def check_reachable(location) -> None:
    """For a :class:`RemotePath`: one request that the bucket exists and the credentials work, or a one-line
    :class:`StoreError` (no bucket, access denied, unreachable endpoint: seconds, not a hang). Local: nothing."""
    if not isinstance(location, RemotePath):
        return
    import pyarrow.fs as pafs

    key = (location.bucket, tuple(sorted(settings(location.options).items())))
    if key in _REACHED:
        return
    try:
        info = location.fs.get_file_info(location.bucket)
    except (OSError, ValueError) as exc:
        raise StoreError(describe_failure(location, exc) or f"{location}: the object store failed ({exc})") from None
    if info.type == pafs.FileType.NotFound:  # no bucket, or an endpoint that answers 404 to everything: ask why
        where = settings(location.options).get("endpoint") or "AWS S3"
        try:
            location.fs.get_file_info(pafs.FileSelector(location.bucket, allow_not_found=False))
        except (OSError, ValueError) as exc:
            low = str(exc).lower()
            if "no_such_bucket" in low or "nosuchbucket" in low or "bucket does not exist" in low:
                raise StoreError(
                    f"{location}: no bucket '{location.bucket}' at {where}; create it first "
                    "(forvalue creates no buckets)"
                ) from None
            reason = str(exc).split(": ", 1)[-1].strip().splitlines()[0][:160]
            raise StoreError(
                describe_failure(location, exc)
                or f"{location}: the endpoint {where} did not answer as an S3 server would ({reason}); check "
                "AWS_ENDPOINT_URL (or --storage-option endpoint=...)"
            ) from None
    _REACHED.add(key)
