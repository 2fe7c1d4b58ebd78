"""The push service's benchmark: ``python -m bench`` (see bench/README.md).

Modules: ``runner`` (command line, one child process per target), ``target``
(one target's servers and scenarios), ``servers`` (Valkey/PostgreSQL +
gunicorn, process measurements), ``loadgen`` (an SSE client process), ``clients`` (driving them),
``sseparse`` (chunked + SSE decoding), ``scenarios``, ``report`` (JSON,
markdown, plots), and the baseline view (``baseline``, ``settings``, ``urls``).
Imports nothing at package level: the load generator processes import only
``bench.loadgen`` and ``bench.sseparse``.
"""
