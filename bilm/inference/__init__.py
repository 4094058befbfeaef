"""Using a trained biLM: ``ElmoEmbedder``, the ``Elmo`` module, published models by name, the
ONNX runtime and the scorer."""
