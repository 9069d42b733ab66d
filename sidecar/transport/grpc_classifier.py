"""gRPC adapter: hashguard's own ``hashguard.v1.Classifier`` API over the data
plane. Wire -> ``ImageCall`` -> data plane -> wire; no policy lives here
(authentication, error mapping and the caller come from ``grpc_gate``)."""

from __future__ import annotations

from ..api import classifier_pb2 as pb
from ..api import classifier_pb2_grpc as pb_grpc
from ..backend.base import DEFAULT_SIGNATURE, ModelRef
from ..plane.dataplane import DataPlane, ImageCall, Outcome
from ..errors import InvalidInput
from .grpc_gate import current_caller
from ..wire.messages import WireImages
from ..judge.policy import Answer


def model_ref(ref: pb.ModelRef) -> ModelRef:
    if not ref.name:
        raise InvalidInput("model name is required")
    if ref.version < 0:
        raise InvalidInput("model version must be >= 0 (0 = latest)")
    return ModelRef(ref.name, ref.version, "", ref.signature_name or DEFAULT_SIGNATURE)


def classification(a: Answer) -> pb.Classification:
    return pb.Classification(label=a.label, scores=a.scores.tolist(),
                             top_k=[pb.LabelScore(label=i, score=s) for i, s in a.top_k])


class ClassifierAdapter(pb_grpc.ClassifierServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def _infer(self, method: str, request, images) -> Outcome:
        return await self.plane.infer(ImageCall(method, model_ref(request.model), images, current_caller(),
                                                request.session_id))

    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        out = await self._infer("Classify", request, WireImages([request.image], single=True))
        return pb.ClassifyResponse(result=classification(out.answers[0]), model_name=out.key.name,
                                   model_version=out.version)

    async def ClassifyBatch(self, request: pb.ClassifyBatchRequest, context) -> pb.ClassifyBatchResponse:
        out = await self._infer("ClassifyBatch", request, WireImages(request.images))
        return pb.ClassifyBatchResponse(results=[classification(a) for a in out.answers], model_name=out.key.name,
                                        model_version=out.version)

    async def ClassifyStream(self, request_iterator, context):
        # In order; a bad request ends the stream with its status, as the unary call would.
        async for request in request_iterator:
            yield await self.Classify(request, context)
