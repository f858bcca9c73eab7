"""GRPO for multi-turn conversational agents: a plain library.

No Prefect, DVC or MLflow imports live here; the pipeline stages in ``tasks/`` wire this library to
those tools. Everything here is usable from a notebook.
"""
