"""Single flight for cold blobs: the spool table, the proxy's own download into a spool, and blob HEADs answered from what is known."""
