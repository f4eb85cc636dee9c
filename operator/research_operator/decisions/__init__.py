"""Decisions: pure functions of the cache and a spec (admission, status, shares, budgets, manifests); no IO."""
