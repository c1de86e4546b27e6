"""Runs the whole system on embedded defaults: a real Kafka-protocol broker and a real PostgreSQL
from PyPI, the migrations, the topics and the four services."""
