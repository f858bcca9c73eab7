"""The application around the ``grpo`` library: params.yaml as a typed model (``params``), running
a stage (``stages``) and the ``grpo-agents`` command line (``cli``)."""
