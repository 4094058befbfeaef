"""The bilm CLI (``held_cli.py ARGS...`` = ``bilm ARGS...``), alone or under torchrun, with two places
where a test can make it wait, so that the test acts at a moment of the run's own progress, never
after a guessed time. Each is off unless its variable is set (only tests set them):

    HOLD_AFTER_STEP=N   after its N-th step the process writes its pid to the file HELD (whole, by a
                        rename) and waits until the file RELEASE exists or it is killed. Under
                        torchrun only rank HOLD_RANK (default 0) holds, and only on torchrun's first
                        start (a restarted rank runs on).
    PAUSE_IN_WRITE=N    the N-th checkpoint write of this process puts the first WRITE_FRACTION (0..1)
                        of its bytes into the temporary file, writes that file's name to IN_WRITE
                        (whole, by a rename) and waits there to be killed.

A process that waits longer than HOLD_SECONDS ends itself (exit 99), so a test that died leaves
nothing behind for long.
"""
import io
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

HOLD_SECONDS = 600


def _announce(path: str, text: str) -> None:
    with open(path + ".part", "w") as f:
        f.write(text)
    os.replace(path + ".part", path)


def _wait(until=lambda: False) -> None:
    deadline = time.monotonic() + HOLD_SECONDS
    while not until():
        if time.monotonic() > deadline:
            os._exit(99)
        time.sleep(0.01)


def _hold_after_step(after: int) -> None:
    import bilm.training.run as run

    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" or \
            os.environ.get("RANK", "0") != os.environ.get("HOLD_RANK", "0"):
        return
    step = run.TrainStep.step

    def held_step(self, batch):
        result = step(self, batch)
        if self.steps_done == after:
            _announce(os.environ["HELD"], str(os.getpid()))
            _wait(lambda: os.path.exists(os.environ["RELEASE"]))
        return result
    run.TrainStep.step = held_step


def _pause_in_write(nth: int, fraction: float) -> None:
    import torch

    save, writes = torch.save, []

    def paused_save(obj, f, *args, **kwargs):
        writes.append(1)
        if len(writes) != nth:
            return save(obj, f, *args, **kwargs)
        whole = io.BytesIO()
        save(obj, whole, *args, **kwargs)
        data = whole.getvalue()
        f.write(data[:int(len(data) * fraction)])
        f.flush()
        _announce(os.environ["IN_WRITE"], f.name)
        _wait()
    torch.save = paused_save


if __name__ == "__main__":
    if os.environ.get("HOLD_AFTER_STEP"):
        _hold_after_step(int(os.environ["HOLD_AFTER_STEP"]))
    if os.environ.get("PAUSE_IN_WRITE"):
        _pause_in_write(int(os.environ["PAUSE_IN_WRITE"]), float(os.environ["WRITE_FRACTION"]))
    from bilm.cli import main

    sys.exit(main(sys.argv[1:]))
