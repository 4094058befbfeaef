"""The biLM's building blocks, shared by training, evaluation and the embedder."""
from bilm.modules.bidirectional import BidirectionalLM
from bilm.modules.lstm import LstmStack, LstmWithProjection
from bilm.modules.scalar_mix import ScalarMix
from bilm.modules.token_encoder import CharCNNEncoder, Highway, WordEmbeddingEncoder

__all__ = ["BidirectionalLM", "CharCNNEncoder", "Highway", "LstmStack", "LstmWithProjection",
           "ScalarMix", "WordEmbeddingEncoder"]
