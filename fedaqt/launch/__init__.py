"""fedaqt.launch — what starts processes: ``run_experiment`` (preflight, Ray temp dir, cluster attach,
``run_simulation``; :mod:`.runner`), our Ray backend (:mod:`.backend`) and the ``fedaqt profile`` harness (fresh
process per client round; :mod:`.profile`).

Only :mod:`fedaqt.cli` imports this package (import-linter contract in pyproject.toml); the server reaches the
backend through the hooks :func:`fedaqt.server.app.make_server_app` takes (``on_round_end``, ``on_finish``).
"""
