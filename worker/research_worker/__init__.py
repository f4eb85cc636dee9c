"""research_worker."""
