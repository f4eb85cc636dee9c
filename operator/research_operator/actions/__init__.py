"""Actions: the reconcile loops and every call to the API server, applying what the decisions say."""
