"""`regcache` subcommands beyond running the stack: client configuration files, prefetch and the settings' docs."""
