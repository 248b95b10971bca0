"""regcache as a mitmproxy script: `mitmdump -s addons/regcache.py` (or mitmweb).

mitmproxy puts this folder first on sys.path, so the package beside this file is importable
without installing it. The addons themselves live in regcache_core.mitm.
"""

from regcache_core.mitm import make_addons

addons = make_addons()
