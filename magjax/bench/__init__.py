"""Benchmarks that print figures: ``python -m magjax.bench {head,backbone,input} ...``.

Each sub-command is a module of this package with a ``main(argv)``; its last printed line is JSON.
"""
