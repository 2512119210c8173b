"""Data: synthetic ground truth, activation harvests to shards, and the Grain shard pipeline."""
