"""Tags and manifests answered in front of the caches: manifests by digest, the tag cache, and the front that answers from them."""
