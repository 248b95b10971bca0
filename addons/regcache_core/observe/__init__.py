"""What regcache shows of its pulls: metrics, the pull log and its statistics, mitmweb's view, hit/miss tracking and the admin endpoint."""
