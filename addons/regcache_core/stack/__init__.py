"""`regcache up`: the registry:2 caches it runs, the proxy's listeners, and the launcher supervising them all."""
