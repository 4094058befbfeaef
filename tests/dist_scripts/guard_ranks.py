"""Run under torchrun (or alone), for tests/test_guard.py.

    guard_ranks.py eval CHECKPOINT MANIFEST OUT_DIR OUT_JSON
        the heldout evaluation of training (bilm.training.heldout) of CHECKPOINT's model on MANIFEST's heldout
        split; rank 0 writes the figures to OUT_JSON
    guard_ranks.py train BLOW_UP_AT_CALL BILM_TRAIN_ARGS...
        bilm train, the heldout figure of the BLOW_UP_AT_CALL-th evaluation (0: none) made 100 times larger
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import bilm.training.heldout as heldout  # noqa: E402
from bilm.data import load_manifest  # noqa: E402
from bilm.core.distributed import init_distributed, shutdown  # noqa: E402
from bilm.runs.trained_model import model_from_checkpoint  # noqa: E402
from bilm.core.vocab import Vocabulary  # noqa: E402


def evaluate(checkpoint, manifest, out_dir, out_json):
    env = init_distributed("cpu")
    model, cfg, vocab, _, pipeline = model_from_checkpoint(checkpoint)
    os.makedirs(out_dir, exist_ok=True)
    held = heldout.prepare_heldout(cfg, load_manifest(manifest), None, out_dir, Vocabulary(vocab), pipeline, env)
    result = held.run(model, env)
    if env.is_main:
        with open(out_json, "w") as f:
            json.dump({**result, "world_size": env.world_size}, f)
    shutdown()


def train(blow_up_at, argv):
    original, calls = heldout.HeldoutEval.run, []

    def run(self, model, env):
        result = original(self, model, env)
        calls.append(1)
        if len(calls) == blow_up_at:
            p = 100 * result["forward"]["perplexity"]
            d = {"perplexity": p, "mean_loss": 0.0}
            return {"forward": d, "backward": d, "average_perplexity": p, "average_mean_loss": 0.0}
        return result
    heldout.HeldoutEval.run = run
    from bilm.cli import main
    sys.exit(main(argv))


if __name__ == "__main__":
    if sys.argv[1] == "eval":
        evaluate(*sys.argv[2:6])
    else:
        train(int(sys.argv[2]), sys.argv[3:])
