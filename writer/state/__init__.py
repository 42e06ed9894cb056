"""What the writers share in Redis: each scan's writer status (``status``), the pool of
writer processes and their claims (``pool``), and the fenced leases on scans and files
(``lease``).

May import: ``hdf5``, ``blissdata``.
"""
