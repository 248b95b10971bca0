"""The data plane: warm blobs sent straight from the caches' storage by sendfile, in worker
processes of their own, on a port of their own (REGCACHE_DATAPLANE_PORT).

The proxy answers a GET of a warm blob with a 307 to a URL signed for that one blob
(handoff.py, grants.py); the workers (workers.py) serve only what such a URL names
(server.py), from registry:2's filesystem layout (storage.py), and send a pull record of each
request to the proxy (records.py). No mitmproxy here: the data plane is plain asyncio and aiohttp.
"""
