"""Archive stores: the local directory (``storage/archives.py``, the default)
and the backends here, one module each (``s3``: S3-compatible object storage),
all with the interface of ``base.Store``. ``open_store`` picks one by URL."""

from __future__ import annotations

from pathlib import Path

from storage.stores.base import Store


def open_store(url: str, *, default_dir: Path, endpoint_url: str = "",
               region: str = "") -> Store:
    """The store at ``url``: empty -> ``default_dir``; ``s3://BUCKET/PREFIX`` ->
    object storage (credentials from the standard AWS chain only); a path or
    ``file://PATH`` -> that directory. Raises ``StorageError`` in one line when
    the bucket is missing or refuses the credentials, ``ValueError`` on a URL
    of another kind."""
    from storage.archives import ArchiveStore

    if not url:
        return ArchiveStore(default_dir)
    if url.startswith("s3://"):
        from storage.stores.s3 import S3ArchiveStore
        return S3ArchiveStore(url, endpoint_url=endpoint_url or None, region=region or None)
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" in url:
        raise ValueError(f"store URL {url!r}: give s3://BUCKET/PREFIX or a directory")
    return ArchiveStore(Path(url))


__all__ = ["Store", "open_store"]
