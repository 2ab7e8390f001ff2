"""Where a store lives: a local folder, or a prefix of an object store (``s3://bucket/prefix``,
and the other schemes fsspec knows: ``gs://`` with gcsfs, ``az://`` with adlfs, …).

Object stores go through fsspec (s3fs for S3), whose S3 client is botocore's: credentials come
from the standard AWS chain (environment, ``~/.aws`` config and credentials files, profiles, SSO,
instance and container roles) and an S3-compatible endpoint from ``AWS_ENDPOINT_URL``. Nothing
here ever sees a key, and a URL carrying one is refused, so none can reach a log or the store.

An object store has no rename, so a store there is created differently from a local one
(`CacheStore.create`): its metadata and plan are built in memory and uploaded with the root
``zarr.json`` last. A store without its root object is an interrupted creation; creating again
uploads the same objects over it. Only this package uses these classes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT_METADATA = "zarr.json"
STORE_FOLDERS = ("rows", "prompts", "done")  # every object of a store but its root lies below one
# other processes write the same prefix: a cached listing would hide their objects (or keep lost ones)
LISTINGS = {"use_listings_cache": False}


class StoreError(Exception):
    """A store that cannot be used as asked; the message is one line for the user."""


def is_url(path: str | Path) -> bool:
    """True for an object-store URL (``scheme://…``, other than ``file://``)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def locate(path: str | Path) -> LocalFolder | ObjectPrefix:
    return ObjectPrefix(str(path)) if is_url(path) else LocalFolder(Path(str(path).removeprefix("file://")))


class LocalFolder:
    """A store in a local (or network-mounted) folder."""

    remote = False

    def __init__(self, path: Path) -> None:
        self.path = path

    def __str__(self) -> str:
        return str(self.path)

    @property
    def identity(self) -> str:
        return str(self.path.resolve())

    def zarr_store(self, read_only: bool) -> Any:
        from zarr.storage import LocalStore

        return LocalStore(self.path, read_only=read_only)

    def read_text(self, key: str) -> str | None:
        try:
            return (self.path / key).read_text()
        except OSError:
            return None

    def exists(self, key: str) -> bool:
        return (self.path / key).exists()

    def occupied(self) -> bool:
        return self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir()))

    def only_store_objects(self) -> bool:
        return False  # a local creation is renamed into place whole: no partial store lies here

    def remove(self) -> None:
        if self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()
        elif self.path.exists():
            shutil.rmtree(self.path)

    def size(self) -> int:
        total = 0
        for root, _dirs, files in os.walk(self.path):
            for name in files:
                try:
                    total += os.path.getsize(os.path.join(root, name))
                except OSError:
                    pass
        return total

    def problem_as_target(self) -> str | None:
        """Why a new store cannot be made here (None: it can)."""
        if self.path.exists() and not self.path.is_dir():
            return f"{self.path} is a file; give the path of a store folder"
        return None

    def prepare(self) -> None:
        """Make what must exist before a store is created here (OSError for the caller)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(self.path.parent, os.W_OK):
            raise StoreError(f"cannot write to {self.path}: permission denied; choose another --out")


class ObjectPrefix:
    """A store under a prefix of an object store, through fsspec."""

    remote = True

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if "@" in parts.netloc:
            raise StoreError(f"{parts.scheme}://…@{parts.netloc.rsplit('@', 1)[1]}{parts.path}: keys do not go in the "
                                "URL; set them through the standard environment or config (for S3: AWS_ACCESS_KEY_ID, "
                                "AWS_PROFILE, ~/.aws/credentials)")
        self.url = url.rstrip("/")
        if not parts.netloc or parts.path.strip("/") == "":
            raise StoreError(f"{url}: give a prefix inside the bucket, e.g. {parts.scheme}://BUCKET/NAME.zarr")
        self.bucket = parts.netloc
        self._fs: Any = None

    def __str__(self) -> str:
        return self.url

    @property
    def identity(self) -> str:
        return self.url

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import fsspec

            try:
                self._fs, self.root = fsspec.core.url_to_fs(self.url, **LISTINGS)
            except (ImportError, ValueError) as error:
                raise StoreError(f"cannot open {self.url}: {error} (for s3:// install inpo's `s3` extra)") from error
        return self._fs

    def _key(self, key: str) -> str:
        self.fs  # noqa: B018 (sets root)
        return f"{self.root}/{key}"

    def _call(self, what: str, action: Any) -> Any:
        """Run a filesystem call; a refusal, missing bucket or unreachable endpoint in one line."""
        try:
            return action()
        except (FileNotFoundError, StoreError):
            raise
        except Exception as error:  # botocore and aiohttp raise many types for these
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise StoreError(
                f"cannot {what} {self.url}: {reason} (check the bucket, AWS_ENDPOINT_URL and the credentials "
                "in the environment or ~/.aws)") from error

    def zarr_store(self, read_only: bool) -> Any:
        from zarr.storage import FsspecStore

        return self._call("open", lambda: FsspecStore.from_url(self.url, read_only=read_only, storage_options=LISTINGS))

    def read_text(self, key: str) -> str | None:
        try:
            return self._call("read", lambda: self.fs.cat_file(self._key(key)).decode())
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return bool(self._call("read", lambda: self.fs.exists(self._key(key))))

    def _top_level(self) -> list[str]:
        """Names directly under the prefix: one delimited listing, however large the store."""
        try:
            found = self._call("list", lambda: self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return []
        return [name.rstrip("/").rsplit("/", 1)[-1] for name in found]

    def occupied(self) -> bool:
        return bool(self._top_level())

    def only_store_objects(self) -> bool:
        """True when everything here lies below a store's folders (an interrupted creation)."""
        names = self._top_level()
        return bool(names) and all(name in STORE_FOLDERS for name in names)

    def remove(self) -> None:
        if self.occupied():
            self._call("delete", lambda: self.fs.rm(self.root, recursive=True))
            self.fs.invalidate_cache()

    def size(self) -> int:
        self.fs.invalidate_cache()
        try:
            return int(self._call("list", lambda: self.fs.du(self.root)))
        except FileNotFoundError:
            return 0

    def problem_as_target(self) -> str | None:
        return None

    def prepare(self) -> None:
        try:
            self._call("reach", lambda: self.fs.ls(self.bucket, refresh=True))
        except FileNotFoundError as error:
            raise StoreError(f"{self.url}: there is no bucket {self.bucket!r} at this endpoint; create it first") from error

    def upload(self, objects: dict[str, bytes]) -> None:
        """Write `objects` (key -> bytes), the root metadata last: the store appears whole or not at all."""
        rest = {self._key(key): value for key, value in objects.items() if key != ROOT_METADATA}
        self._call("write to", lambda: self.fs.pipe(rest))
        self._call("write to", lambda: self.fs.pipe_file(self._key(ROOT_METADATA), objects[ROOT_METADATA]))
        self.fs.invalidate_cache()


def attributes_of(location: LocalFolder | ObjectPrefix) -> dict[str, Any]:
    """The group attributes in the root metadata, or {} where there is none (no validation)."""
    text = location.read_text(ROOT_METADATA)
    try:
        return json.loads(text).get("attributes", {}) if text else {}
    except ValueError:
        return {}
