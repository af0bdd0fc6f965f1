"""MLflow, in one style: the tracked run, the local server, the registry, the pyfunc model."""
