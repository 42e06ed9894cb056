"""Redis URLs as shown to people: the password masked (``redis://user:***@host:port``).

Every log line, message, exception and status that names a Redis URL goes through
`masked()`: beamline logs are collected centrally and read widely, and a URL may carry the
password (``redis://:PASSWORD@host``, ``redis://user:PASSWORD@host``,
``unix:///run/redis.sock?password=PASSWORD``).
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://user:password@ : the password runs to the last "@" before a blank (an unescaped
# "@" in a password is taken by redis-py as part of it: so must the mask be)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s:@/]*):"
                       r"(?P<password>\S*)@")
# ?password=... or &password=... (redis-py reads the password from the query too)
_QUERY = re.compile(r"(?P<key>[?&](?:password|pass|pwd|token)=)(?P<password>[^&#\s'\"]*)",
                    re.IGNORECASE)


def masked(text: str) -> str:
    """`text` (a URL, or a message naming URLs) with every password in a URL replaced by
    ``***``; the user name, host, port and database stay readable."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", str(text))
    return _QUERY.sub(lambda m: f"{m['key']}{MASK}", text)
