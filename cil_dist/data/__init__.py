"""Shard format (manifest), shard reading and the training/evaluation input pipeline."""
