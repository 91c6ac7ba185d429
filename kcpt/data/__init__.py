"""Data pipeline: read → clean/filter/dedup → tokenize → pack → Parquet shards (+ Ray Data)."""
