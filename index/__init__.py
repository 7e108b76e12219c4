"""The FAISS index over a run's Parquet rows: build, update, tune, search, dedup (and, in index.service, HTTP)."""

# `shardlight dedup`'s cosine similarity at or above which two images are near-duplicates, chosen from
# re-encodes, resizes and crops vs distinct images (bench/dedup_threshold.py; the evidence and its limits:
# docs/index.md, "Near-duplicates"). Here, import-free, so that the CLI shows it without loading FAISS.
DEDUP_THRESHOLD = 0.99
