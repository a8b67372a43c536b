"""Views of a :class:`~onnxserve.toolkit.graph.GraphDocument`: a static SVG and a self-contained HTML viewer."""
