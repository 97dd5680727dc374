"""gpuwatch's Kafka runtime, shared by every stage: thin wrappers over confluent-kafka built from Settings.

- `producer`: `ReliableProducer`, the one producer for output that must not be lost, its `PERMANENT_ERRORS`,
  and `flush_until_acknowledged`; the agent's `Publisher` keeps its disk spool on top of it.
- `loop`: `BatchLoop`, the one consume -> process -> produce -> commit loop (offsets move only after every
  output of the batch is acknowledged).
- `consumer`: consumers, committing a batch, reading partitions from the start.
- `admin`: topic helpers. `credentials`: the security settings for faust's consumer.
"""

from gpuwatch.kafka.admin import (
    TopicIdentity,
    all_topics,
    ensure_compacted_topic,
    ensure_topics,
    partition_count,
)
from gpuwatch.kafka.consumer import batch_offsets, commit_batch, make_consumer, read_partitions_to_end
from gpuwatch.kafka.credentials import faust_credentials
from gpuwatch.kafka.loop import BatchLoop, Output, Process, Processed
from gpuwatch.kafka.producer import (
    PERMANENT_ERRORS,
    ReliableProducer,
    flush_until_acknowledged,
    make_producer,
    produce,
)

__all__ = [
    "PERMANENT_ERRORS",
    "BatchLoop",
    "Output",
    "Process",
    "Processed",
    "ReliableProducer",
    "TopicIdentity",
    "all_topics",
    "batch_offsets",
    "commit_batch",
    "ensure_compacted_topic",
    "ensure_topics",
    "faust_credentials",
    "flush_until_acknowledged",
    "make_consumer",
    "make_producer",
    "partition_count",
    "produce",
    "read_partitions_to_end",
]
