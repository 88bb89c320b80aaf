"""Sub-commands of the ``ebb`` command line (each registers itself on a parser)."""
