"""The names of the files a model directory holds: what ``bilm export`` writes, what a published
model directory and an ONNX serving directory hold. Spelled here only."""

OPTIONS_FILE = "options.json"            # the architecture (bilm-tf's options.json)
WEIGHTS_FILE = "weights.hdf5"            # the biLM in the published ELMo layout
SOFTMAX_FILE = "softmax.hdf5"            # export --include-softmax: the language model's softmax
VOCAB_FILE = "vocab.txt"                 # one token a line, the softmax's rows
TOKENIZER_FILE = "tokenizer.json"        # the text pipeline the model was trained with
SP_MODEL_FILE = "sentencepiece.model"    # beside tokenizer.json for a SentencePiece model
ONNX_FILE = "model.onnx"                 # the stateless biLM as ONNX (export --format onnx)
# What a serving directory holds beside model.onnx.
SERVING_FILES = (OPTIONS_FILE, TOKENIZER_FILE, SP_MODEL_FILE, VOCAB_FILE)
