"""research_cli: ``kubectl research``, the kubectl plugin for ResearchJobs (users and admins)."""
