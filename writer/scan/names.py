"""NeXus names: what the writer derives from stream names, and what it warns about.

A valid NeXus name (the NXDL's recommended rule, the one nexusformat and punx check) is ASCII
letters, digits and underscores, not starting with a digit.
"""

from __future__ import annotations

import re
import unicodedata

NEXUS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def nexus_name(text: str) -> str:
    """A valid NeXus name close to `text`: accents dropped (ü -> u), any other character
    outside [A-Za-z0-9_] replaced by "_", "_" before a leading digit."""
    out = []
    for char in text:
        if char.isascii():
            out.append(char if char.isalnum() or char == "_" else "_")
            continue
        plain = unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode()
        plain = re.sub(r"[^A-Za-z0-9_]", "", plain)
        out.append(plain or "_")
    name = "".join(out) or "stream"
    return "_" + name if name[0].isdigit() else name


def invalid_names(paths) -> list[str]:
    """The entry-relative paths among `paths` whose last name is not a valid NeXus name."""
    return [p for p in paths if not NEXUS_NAME.match(p.rsplit("/", 1)[-1])]
