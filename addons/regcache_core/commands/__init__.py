"""The `regcache` commands besides `up`: each module is one command's work, called by cli.py."""
