"""bilm: pretrain ELMo on your own corpus in PyTorch; load and export the published ELMo format."""
from bilm.core.version import __version__  # noqa: F401

from bilm.core.chars import CharIdMapper  # noqa: E402


def __getattr__(name):
    # Heavy imports (torch, h5py) only when the embedder is asked for.
    if name in ("ElmoEmbedder",):
        from bilm.inference.embedder import ElmoEmbedder
        return ElmoEmbedder
    if name in ("Elmo",):
        from bilm.inference.elmo import Elmo
        return Elmo
    if name == "ScalarMix":
        from bilm.modules.scalar_mix import ScalarMix
        return ScalarMix
    raise AttributeError(name)
