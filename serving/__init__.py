"""hashguard's embedded model server: TF Serving's gRPC API over SavedModels.

``python -m serving --model_name NAME --model_base_path DIR`` (or
``--model_config_file``) serves ``PredictionService`` (Predict,
GetModelMetadata), ``ModelService`` (GetModelStatus), gRPC health checking and
reflection, so stock ``tensorflow-serving-api`` clients work unchanged.
Programmatic use: :class:`serving.server.ServingServer` with
:class:`serving.config.ModelConfig`. Importing this package does not import
TensorFlow; :mod:`serving.server` does.
"""

from .config import BatchingConfig, ModelConfig, ServerConfig, VersionPolicy

__all__ = ["BatchingConfig", "ModelConfig", "ServerConfig", "VersionPolicy"]
