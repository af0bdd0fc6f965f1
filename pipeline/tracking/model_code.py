"""MLflow models-from-code entry point for the detector (see `pipeline.tracking.pyfunc`).

MLflow copies this file into the logged model and executes it on loading, so nothing is
unpickled: the weights come from the model file artifact (``torch.load(weights_only=True)``).
"""

import mlflow

from pipeline.tracking.pyfunc import DetectorPyfunc

mlflow.models.set_model(DetectorPyfunc())
