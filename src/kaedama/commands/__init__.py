"""CLI stage modules: each exposes ``HELP``, ``configure(parser)`` and ``run(args) -> int``."""
