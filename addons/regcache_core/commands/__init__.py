"""`regcache` subcommands beyond running the stack: client configuration files and prefetch."""
