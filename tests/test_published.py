"""Published models by name: downloaded once from a loopback HTTP server into the cache, safely."""
from __future__ import annotations

import os
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import h5py
import numpy as np
import pytest
import torch

from bilm.modules import published
from bilm.cli import main as bilm_main
from conftest import OPTIONS, WEIGHTS


class _Server:
    """Serves files from a dict path -> bytes, honours Range, and can cut a transfer short once."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests, self.cut_once = files, [], set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in server.cut_once:  # announce everything, send half, hang up
                    server.cut_once.discard(self.path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path, monkeypatch):
    files = {"/m/options.json": open(OPTIONS, "rb").read(), "/m/weights.hdf5": open(WEIGHTS, "rb").read(),
             "/bad/options.json": open(OPTIONS, "rb").read(), "/bad/weights.hdf5": b"not hdf5 at all" * 100}
    srv = _Server(files)
    monkeypatch.setenv("BILM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BILM_OFFLINE", raising=False)
    monkeypatch.setattr(published, "MODELS", dict(published.MODELS))  # registrations end with the test
    published.register(published.PublishedModel("fixture", f"{srv.url}/m/options.json", f"{srv.url}/m/weights.hdf5"))
    published.register(published.PublishedModel("original", f"{srv.url}/m/options.json", f"{srv.url}/m/weights.hdf5"))
    published.register(published.PublishedModel("broken", f"{srv.url}/bad/options.json", f"{srv.url}/bad/weights.hdf5"))
    published.register(published.PublishedModel("missing", f"{srv.url}/nope/options.json", f"{srv.url}/nope/w.hdf5"))
    yield srv
    srv.close()


def test_first_use_downloads_and_caches_second_makes_no_request(server, tmp_path):
    options, weights = published.resolve_model("fixture", progress=False)
    assert options.startswith(str(tmp_path / "cache")) and open(weights, "rb").read() == open(WEIGHTS, "rb").read()
    n = len(server.requests)
    assert n == 2
    assert published.resolve_model("FIXTURE", progress=False) == (options, weights)  # names are case-insensitive
    assert len(server.requests) == n


def test_a_cut_transfer_is_resumed_and_never_used_half_written(server, monkeypatch):
    server.cut_once.add("/m/weights.hdf5")
    seen = []
    real = published._download

    def watch(url, path, progress, label):
        seen.append(os.path.exists(path))  # the final name never exists before the download completes
        return real(url, path, progress, label)

    monkeypatch.setattr(published, "_download", watch)
    options, weights = published.resolve_model("fixture", progress=False)
    assert open(weights, "rb").read() == open(WEIGHTS, "rb").read()
    ranges = [r for p, r in server.requests if p == "/m/weights.hdf5"]
    assert ranges[0] is None and ranges[1] is not None and ranges[1] != "bytes=0-"  # resumed, not restarted
    assert seen == [False, False, False]
    assert not os.path.exists(weights + ".partial")


def test_a_broken_download_is_removed_and_named(server):
    with pytest.raises(published.ModelUnavailable, match="not a usable model"):
        published.resolve_model("broken", progress=False)
    assert not os.path.exists(os.path.join(published.cache_dir(), "broken", "weights.hdf5"))


def test_404_and_refused_connection_give_one_line_naming_the_url(server, capsys):
    argv = ["embed", "--model", "missing", "--input", OPTIONS, "--out", "x.hdf5"]
    assert bilm_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{server.url}/nope/options.json" in err and "HTTP 404" in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    published.register(published.PublishedModel("refused", f"{dead}/o.json", f"{dead}/w.hdf5"))
    assert bilm_main(["embed", "--model", "refused", "--input", OPTIONS, "--out", "x.hdf5"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{dead}/o.json" in err and "refused" in err.lower()


def test_offline_uses_the_cache_or_says_where_to_put_the_files(server, monkeypatch):
    published.resolve_model("fixture", progress=False)
    n = len(server.requests)
    monkeypatch.setenv("BILM_OFFLINE", "1")
    assert published.resolve_model("fixture", progress=False)
    assert len(server.requests) == n
    path = os.path.join(published.cache_dir(), "original", "options.json")
    with pytest.raises(published.ModelUnavailable) as info:
        published.resolve_model("original", progress=False)
    assert f"{server.url}/m/options.json" in str(info.value) and path in str(info.value)
    assert len(server.requests) == n


def test_the_elmo_tutorial_runs_with_only_the_import_changed(server):
    from bilm import ElmoEmbedder

    elmo = ElmoEmbedder()
    vectors = list(elmo.embed_sentences([["First", "sentence", "."], ["Another", "."]]))
    assert [v.shape for v in vectors] == [(3, 3, 32), (3, 2, 32)]
    assert elmo.stateful  # as AllenNLP's
    assert ElmoEmbedder("fixture", cuda_device=-1).device.type == "cpu"  # AllenNLP's keyword
    assert ElmoEmbedder("fixture", None, -1).device.type == "cpu"        # and its positional form

    from bilm.elmo import Elmo, batch_to_ids
    elmo_module = Elmo(num_output_representations=2, dropout=0)
    out = elmo_module(batch_to_ids([["First", "sentence", "."], ["Another", "."]]))
    assert len(out["elmo_representations"]) == 2 and out["elmo_representations"][0].shape == (2, 3, 32)


def test_urls_as_allennlp_users_pass_them_are_cached(server):
    from bilm import ElmoEmbedder

    a = ElmoEmbedder(f"{server.url}/m/options.json", f"{server.url}/m/weights.hdf5", stateful=False)
    n = len(server.requests)
    b = ElmoEmbedder(f"{server.url}/m/options.json", f"{server.url}/m/weights.hdf5", stateful=False)
    assert len(server.requests) == n
    np.testing.assert_array_equal(a.embed_sentence(["a", "b"]), b.embed_sentence(["a", "b"]))


def test_model_directories_work_where_names_do(tmp_path, capsys):
    model = tmp_path / "my_model"
    model.mkdir()
    shutil.copy(OPTIONS, model / "options.json")
    shutil.copy(WEIGHTS, model / "weights.hdf5")
    assert published.resolve_model(str(model)) == (str(model / "options.json"), str(model / "weights.hdf5"))
    (model / "weights.hdf5").unlink()
    with pytest.raises(FileNotFoundError, match="missing .*weights.hdf5"):
        published.resolve_model(str(model))
    with pytest.raises(ValueError, match="unknown model 'tiny-elmo'.*original"):
        published.resolve_model("tiny-elmo")


def test_train_init_model_starts_from_the_published_weights(server, tmp_path):
    from train_helpers import TRAIN_DATA, TRAIN_VOCAB, TINY

    run = tmp_path / "run"
    assert bilm_main(["train", "--config", TINY, "--data", TRAIN_DATA, "--vocab", TRAIN_VOCAB, "--out", str(run),
                      "--init-model", "fixture", "--set", "train.max_steps=1", "--set", "train.device=cpu",
                      "--no-progress"]) == 0
    from bilm.runs.trained_model import model_from_checkpoint
    trained = model_from_checkpoint(str(run))
    assert trained.config.model.char_cnn.n_highway == 2  # the fixture's architecture (tiny.yaml has 1)
    # One step of Adagrad moves a weight by at most lr = 0.2: it started from the fixture's, not afresh.
    with h5py.File(WEIGHTS) as f:
        published = torch.from_numpy(f["char_embed"][...])
    got = trained.model.bilm.token_encoder.char_embedding.weight.detach()[1:]
    assert got.shape == published.shape and float((got - published).abs().max()) <= 0.2 + 1e-6
