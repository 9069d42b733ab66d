"""hashguard's embedded model server: a small TF Serving for SavedModels.

``python -m serving --model_name NAME --model_base_path DIR`` (or
``--model_config_file``) serves ``PredictionService`` (Predict, Classify,
Regress, MultiInference, GetModelMetadata), ``ModelService`` (GetModelStatus,
HandleReloadConfigRequest), gRPC health checking and reflection, and with
``--rest_api_port`` TF Serving's REST API, so stock ``tensorflow-serving-api``
clients and TF Serving's own model-server tests work unchanged (docs/serving.md).
Programmatic use: :class:`serving.server.ServingServer` with
:class:`serving.config.ModelConfig`. Importing this package does not import
TensorFlow; :mod:`serving.server` does.
"""

from .config import BatchingConfig, ModelConfig, ServerConfig, VersionPolicy

__all__ = ["BatchingConfig", "ModelConfig", "ServerConfig", "VersionPolicy"]
