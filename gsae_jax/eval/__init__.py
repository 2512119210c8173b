"""Evaluation metrics (GATED_SAE.md section 5)."""
