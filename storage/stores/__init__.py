"""Archive stores other than the local directory (``storage/archives.py``),
one module per backend with the same interface: ``s3`` (S3-compatible object
storage)."""
