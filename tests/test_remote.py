"""--remote: probes through nnsight's NDIF client, with only the network mocked.

The fake replaces the two things nnsight's RemoteBackend talks to, `websocket.create_connection` and
`httpx.Client`, and does what the server does with a request: deserialize it against a model that has weights
(here: the same tiny checkpoint, loaded locally), run it, and send the saved values back as a COMPLETED response.
Everything between our probe code and the wire is nnsight's real client.
"""

import io
import json
from dataclasses import replace

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
import websocket
from nnsight.intervention.backends.local import LocalSimulationBackend
from nnsight.modeling import huggingface as nnsight_hf
from nnsight.schema.request import RequestModel
from nnsight.schema.response import ResponseModel, Status
from nnsight.tracing import tracer as nnsight_tracer

from probes.errors import ProbeError
from probes.methods.catalog import PROBES
from probes.runs.execution import run_probe
from probes.models.loading import checkpoint, load_remote
from probes.tasks.files import load_task

from .conftest import REGISTRY, loaded

KEY = "ndif-test-key-3f9a"


class Recording(dict):
    """A serialized frame's locals that remember what the trace pushed back (its saved values)."""

    def __init__(self, *a):
        super().__init__(*a)
        self.pushed = {}

    def update(self, other=(), **kw):
        self.pushed.update(other, **kw)
        super().update(other, **kw)


class FakeNDIF:
    def __init__(self, server_model):
        self.server = server_model
        self.headers = []
        self.results = []

    def run(self, data: dict, files: dict) -> None:
        request = RequestModel.model_validate_json(data["data"])
        blob = files["blob"][1]
        # as on the server, where this repository is not installed: what the request needs must travel in it
        hider = LocalSimulationBackend(None)
        hidden = hider._hide_local_modules()
        try:
            tracer = RequestModel.deserialize(blob, self.server._remoteable_persistent_objects(),
                                              compress=request.compress)
        finally:
            hider._restore(hidden)
        tracer.info.frame.f_locals = Recording(tracer.info.frame.f_locals)
        nnsight_tracer.inc()
        try:
            tracer.execute(tracer.info.code)
            # what the outermost block returns: the values it saved (inner traces of a session push everything)
            saved = nnsight_tracer._saves()
            result = {k: v for k, v in tracer.info.frame.f_locals.pushed.items() if id(v) in saved}
        finally:
            nnsight_tracer.dec()
        buf = io.BytesIO()
        torch.save(result, buf)
        result = buf.getvalue()
        if request.compress:  # the server compresses its result as the request was
            import zstandard

            result = zstandard.ZstdCompressor().compress(result)
        self.results.append(ResponseModel(id="job", status=Status.COMPLETED, data=result).pickle())

    # websocket boundary
    def create_connection(self, url, header=None):
        self.headers.append(header)
        fake = self

        class Socket:
            sent_session = False

            def recv(self):
                if not self.sent_session:
                    self.sent_session = True
                    return json.dumps({"session_id": "session"})
                return fake.results.pop(0)

            def settimeout(self, _):
                pass

            def close(self):
                pass

        return Socket()

    # HTTP boundary
    def client(self, *args, **kwargs):
        fake = self

        class Client:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def post(self, url, data=None, files=None, headers=None):
                fake.headers.append(headers)
                fake.run(data, files)
                body = ResponseModel(id="job", status=Status.RECEIVED).model_dump_json()
                return httpx.Response(200, text=body, request=httpx.Request("POST", url))

        return Client()


@pytest.fixture
def ndif(monkeypatch):
    server = loaded("tiny-llama", attn_implementation="eager")
    fake = FakeNDIF(server.model)
    monkeypatch.setattr(websocket, "create_connection", fake.create_connection)
    monkeypatch.setattr(httpx, "Client", fake.client)
    monkeypatch.setenv("NDIF_API_KEY", KEY)
    # the model key canonicalises the repo id with a hub call: answer it as the hub would
    monkeypatch.setitem(nnsight_hf._ID_CACHE, hub_spec().repo, "probe-test/tiny-llama")
    return fake


def hub_spec():
    """tiny-llama as if it were a hub model NDIF hosts (its repo id is the local checkpoint)."""
    path, _, _ = checkpoint(REGISTRY["tiny-llama"])
    return replace(REGISTRY["tiny-llama"], name="tiny-llama", source="hub", repo=path, revision="main", random=None)


@pytest.mark.parametrize("probe, task", [("logit-lens", "capitals"), ("accuracy", "capitals"),
                                         ("ffn-readout", "capitals"), ("ffn-ablation", "capitals"),
                                         ("ffn-transplant", "capitals"),
                                         ("nback", "nback"), ("attention", "nback-sequence")])
def test_remote_probe_equals_local_and_never_writes_the_key(ndif, tmp_path, probe, task):
    remote = load_remote(hub_spec(), **PROBES[probe].load)
    assert next(remote.model._module.parameters()).device.type == "meta"  # no weights on the client
    t = load_task(task, {"sequences": 1, "n": [1, 2]} if task.startswith("nback") else {"ambiguous": "flag"})
    # random weights switch no answer on by an FFN: the transplant is given its sources and block
    options = {"source_items": "Abkhazia,Afghanistan", "source_layer": 1}
    got, _ = run_probe(remote, t, probe, tmp_path / "remote", limit=6, batch_size=3, options=options,
                       progress=False)
    want, _ = run_probe(loaded("tiny-llama", **PROBES[probe].load), t, probe, tmp_path / "local", limit=6,
                        batch_size=3, options=options, progress=False)
    # the read-out's causal check is a ratio over each pair's logit gap, which on a tiny random model is small and
    # scales float noise up by its inverse: compared relatively, everything else absolutely
    ratio = [c for c in ("ffn_patch_recovery",) if c in got]
    pd.testing.assert_frame_equal(got.drop(columns=ratio), want.drop(columns=ratio), check_exact=False, atol=1e-5)
    for c in ratio:
        assert np.allclose(got[c], want[c], rtol=1e-3, atol=1e-5, equal_nan=True), c
    assert len(ndif.results) == 0 and ndif.headers and all(h["ndif-api-key"] == KEY for h in ndif.headers)
    assert json.loads((tmp_path / "remote" / "meta.json").read_text())["remote"] is True
    for f in (tmp_path / "remote").rglob("*"):
        assert not f.is_file() or KEY not in f.read_text(errors="ignore")


def test_remote_refuses_what_it_cannot_run(monkeypatch):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    with pytest.raises(ProbeError, match="needs an NDIF API key in the environment variable NDIF_API_KEY"):
        load_remote(hub_spec())
    monkeypatch.setenv("NDIF_API_KEY", KEY)
    with pytest.raises(ProbeError, match="runs hub models hosted by NDIF; 'tiny-llama' is a random model"):
        load_remote(REGISTRY["tiny-llama"])
