"""The flow.metadata keys by which regcache's addons hand each other what they learnt about a flow."""

TARGET = "regcache.target"  # the routing decision
CLIENT_HOST = "regcache.client_host"  # the Host header, as the client (or a cache) sent it; routing rewrites it
CLIENT_PATH = "regcache.client_path"  # the path and query, as the client (or a cache) sent them; routing rewrites them
BYTE_COUNTER = "regcache.bytes"  # counts a streamed body
CACHE_RESULT = "regcache.cache"  # "hit", "miss" or "stale", set once the cache's upstream use is known
EGRESS_FOR = "regcache.egress_for"  # the Registry whose egress listener the flow came in on
EGRESS = "regcache.egress"  # the Target a cache asked its upstream for
UPSTREAM = "regcache.upstream"  # the Target of a flow sent upstream with our credentials
REDIRECT = "regcache.redirect"  # the Target whose upstream answer redirected the flow we follow
INJECTED = "regcache.injected"  # the Authorization header is ours
IN_FLIGHT = "regcache.in_flight"  # counted in the in-flight gauge, not yet finished
COLD_BLOB = "regcache.cold_blob"  # a client's GET or HEAD of a blob its cache does not hold (cold_blobs.py answers it)
HANDED_OFF = "regcache.handed_off"  # answered with a 307 to the data plane
SPOOL_FOLLOWER = "regcache.spool_follower"  # a cache's fetch answered by single_flight.py (a spool, a known HEAD)
HEAD_FLIGHT = "regcache.head_flight"  # the spool Key of a blob HEAD that goes upstream for concurrent ones
RECORD = "regcache.record"  # the flow's PullRecord, once it ended
PLANNED = "regcache.planned"  # a manifest request answered from what regcache learnt (manifest_front.py)
ANSWERED_HERE = "regcache.answered_here"  # the response was made by regcache (from memory, a refusal), not a backend
DEADLINE = "regcache.deadline"  # monotonic time by which an upstream must answer; None once passed
UPSTREAM_ANSWER_SEEN = "regcache.upstream_answer_seen"  # HitMarker has counted this egress flow's answer
