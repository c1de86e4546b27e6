"""What two or more services share: the contract as pydantic models, settings, the database pool,
Kafka client settings, the rollout bucket and logging."""
