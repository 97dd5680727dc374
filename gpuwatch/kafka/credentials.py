"""The Kafka security settings for the one client that is not confluent-kafka: faust's aiokafka consumer."""

from __future__ import annotations

import ssl
from typing import Any

from gpuwatch.config import Settings


def faust_credentials(settings: Settings) -> Any:
    """The Kafka security settings as faust `broker_credentials` (None for PLAINTEXT), so the stream worker's
    aiokafka consumer uses the same SASL and TLS settings as the confluent-kafka clients."""
    import faust

    protocol = settings.kafka_security_protocol.upper()
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
        if settings.kafka_ssl_certfile:
            context.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile or None,
                                    password=settings.kafka_ssl_key_password or None)  # fmt: skip
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password,
            mechanism=settings.kafka_sasl_mechanism or "PLAIN",
            ssl_context=context,
        )
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    return None
