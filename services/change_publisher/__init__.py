"""The change publisher: sends the membership-changes outbox to Kafka (docs/design.md, Membership changes)."""
