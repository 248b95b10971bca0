"""regcache: a pull-through cache for container registries, built on mitmproxy and registry:2."""
