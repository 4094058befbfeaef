"""Files bilm reads and writes for other tools: the published ELMo weight layout (what AllenNLP
reads), bilm-tf checkpoints, the export and the ONNX graph."""
