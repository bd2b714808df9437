"""Local developer tooling for kalm-batch storage (see storage/local_s3.py)."""
