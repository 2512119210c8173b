"""Data sources: synthetic ground truth now; activation shards and the Grain pipeline later."""
