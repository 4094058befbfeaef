"""Files bilm shares with other tools, read and written as files (no model building): the
published ELMo weight layout (what AllenNLP reads), bilm-tf's TensorFlow checkpoints and the
ONNX graph's contract."""
