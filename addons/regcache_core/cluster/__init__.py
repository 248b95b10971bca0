"""Several replicas as one cache: the Redis they share (link.py) and what lives there."""
