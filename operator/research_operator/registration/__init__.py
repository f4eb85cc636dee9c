"""Registration: what the operator watches (kopf handlers and indices); they feed the cache and wake loops."""
