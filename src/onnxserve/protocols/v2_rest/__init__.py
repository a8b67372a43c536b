"""KServe V2 (Open Inference Protocol) over HTTP/REST, with Triton's binary tensor extension."""
