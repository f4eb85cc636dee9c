"""research_api."""
