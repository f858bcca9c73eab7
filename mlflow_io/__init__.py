"""The pipeline's one door to MLflow: run tracking (``tracking``), the model registry and its
promotion gate (``registry``), and the two registered models' pyfuncs. Stages and flows log and
register through here; ``grpo/`` never imports MLflow."""
