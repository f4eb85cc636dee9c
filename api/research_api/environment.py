"""The environment variables of a worker container: the operator sets them, the worker reads them.

Secrets never travel in the task: it names the variables (``apiKeyEnv``, ``dsnEnv``) and the Job
feeds them from Secrets.
"""

from __future__ import annotations

TASK_ENV = "RESEARCH_TASK"  # the task (research_api.task.ResearchTask) as JSON
API_KEY_ENV = "OPENAI_API_KEY"  # the model endpoint's API key
DSN_ENV = "RESEARCH_PG_DSN"  # the PostgreSQL store's DSN
TAVILY_KEY_ENV = "TAVILY_API_KEY"  # the Tavily search API key
