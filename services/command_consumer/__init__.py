"""Command consumer: Kafka in → validated command → one handler → one DB transaction → outcome out."""
