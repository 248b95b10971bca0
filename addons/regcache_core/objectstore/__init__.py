"""Caches on S3-compatible object storage (K_STORAGE=s3://BUCKET/PREFIX): regcache's own S3
calls (client.py), registry:2's layout of a storage root (layout.py), the bucket checked at
start (bucket.py), warm blobs found, read, presigned and streamed (blobs.py), and whether the
store can be reached (health.py)."""
