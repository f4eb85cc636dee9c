"""offline_model."""
