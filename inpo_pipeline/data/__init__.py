"""Data sources (parquet, hub, manifest), prompt sets, AI-feedback labels, and stage two's batches."""
