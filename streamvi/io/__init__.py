"""Getting records in and outputs out: interfaces, codecs, Kafka clients, the embedded broker."""
