"""research_operator."""
