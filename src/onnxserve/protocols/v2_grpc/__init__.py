"""KServe V2 over gRPC (``inference.GRPCInferenceService``), wire compatible with tritonclient.grpc."""
