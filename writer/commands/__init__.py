"""What a user runs: ``blisswriter`` (``cli``: run, status, end, validate, rewrite, serve)
and the demo. Each command module parses, calls the rooms below, prints.

May import: every other room of ``writer`` and ``blissdata``. Nothing imports it but
``web`` and the tests.
"""
