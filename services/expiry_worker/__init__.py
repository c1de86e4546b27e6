"""Expiry worker: clock → batch of expired rows → history → gone."""
