"""The archive stage: Kafka topics to Parquet files partitioned by day and host, read back by score, eval and train,
and the failure labels derived from them (docs/archive.md)."""
