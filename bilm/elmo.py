"""``from bilm.elmo import Elmo, batch_to_ids``: the documented entry point (AllenNLP's spelling).

The module lives in ``bilm/inference/elmo.py``; this file only re-exports it.
"""
from bilm.inference.elmo import Elmo, batch_to_ids

__all__ = ["Elmo", "batch_to_ids"]
