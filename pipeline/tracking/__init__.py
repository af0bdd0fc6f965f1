"""MLflow, in one style: the tracked run, the local server, the registry, the pyfunc model.

Every MLflow call goes through an explicit client (`pipeline.tracking.run.mlflow_client`); the one
exception, logging a model (MLflow needs an active run for it), is `pipeline.tracking.fluent`.
"""

import os

# Nothing this project logs is a pickle: its one MLflow model is a pyfunc logged from code that
# loads its weights with torch.load(weights_only=True) (`pipeline.tracking.pyfunc`). MLflow 3.17
# still unpickles by default (a pickled pyfunc python model, mlflow.pytorch's "pickle" format, ...),
# and unpickling a model someone else logged can run arbitrary code. So MLflow's own loaders refuse
# pickles in any process that imports this package, unless the user chose otherwise by setting it.
os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
