"""Aggregation strategies: one interface, one registry."""
