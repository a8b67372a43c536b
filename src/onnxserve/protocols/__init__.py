"""Wire protocols: thin codecs between a wire format and onnxserve's core types."""
