"""Talking to upstream registries: credentials and tokens (auth), regcache's own requests (client), where a redirect may lead (redirects), what answers tell of the upstream (signals, state)."""
