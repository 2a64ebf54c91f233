"""Shards, the sample transform and the Ray Data pipeline."""
