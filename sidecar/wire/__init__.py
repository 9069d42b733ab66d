"""Wire formats: images (raw, PNG, JPEG), TensorProto codecs and TF Serving's protobuf modules."""
