"""Who may use regcache: client networks and accounts, connection caps, the egress guard, and signed URL fields."""
