"""examples/serve_many_models.py as a user runs it: three models behind one HTTP endpoint under a
GPU budget that holds two of them, many requests at once, each answered as the model itself
answers; Prometheus shows each model; an unknown model or one no tier holds is a JSON error."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

import memplan
from tests.conftest import free_port, save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
# name: (layers, intermediate size, seed): 465, 634 and 898 KiB of bf16 weights; the GPU holds two
MODELS = {"small": (4, 160, 1), "medium": (6, 160, 2), "large": (8, 192, 3)}
INPUTS = [[[1, 2, 3, 4, 5, 6, 7, 8]], [[9, 8, 7], [6, 5, 4]], [[300, 17, 256, 511, 0]]]


class Served:
    def __init__(self, url: str, paths: dict[str, Path], process: subprocess.Popen[str]) -> None:
        self.url, self.paths, self.process = url, paths, process

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                raw, status, kind = r.read(), r.status, r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            raw, status, kind = e.read(), e.code, e.headers.get("Content-Type", "")
        return status, json.loads(raw) if kind.startswith("application/json") else raw.decode()

    def forward(self, name: str, ids: list[list[int]]) -> tuple[int, Any]:
        return self.request("POST", f"/v1/models/{name}/forward", {"input_ids": ids})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("serving")
    paths = {
        name: save_tiny_llama(root / name, layers=layers, intermediate=inter, seed=seed)
        for name, (layers, inter, seed) in MODELS.items()
    }
    paths["huge"] = save_tiny_llama(root / "huge", layers=24, intermediate=512, seed=4)  # 5.2 MiB
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "examples/serve_many_models.py", "--port", str(port),
         "--models", *(f"{n}={p}" for n, p in paths.items()),
         "--gpu", "1.75MiB", "--host-tier", "1.5MiB", "--disk", str(root / "spill"), "--context", "64"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    stdout = process.stdout
    assert stdout is not None
    said: list[str] = []  # warnings may come first; "serving ..." is printed once it listens
    while not (said and said[-1].startswith("serving")) and (line := stdout.readline()):
        said.append(line)
    assert said and said[-1].startswith(f"serving 4 models at http://127.0.0.1:{port}"), "".join(said)
    drain = threading.Thread(target=lambda: said.extend(stdout), daemon=True)
    drain.start()  # a full pipe would stall the server
    try:
        yield Served(f"http://127.0.0.1:{port}", paths, process)
    finally:
        process.terminate()
        process.wait(timeout=60)
        drain.join(timeout=10)
        assert process.returncode == 0, "".join(said)  # shut down cleanly on SIGTERM, every lease given back


def summary(logits: torch.Tensor) -> tuple[list[list[int]], str]:
    """Argmax ids and the SHA-256 of the bf16 logits, as the example computes them."""
    raw = logits.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    return logits.argmax(-1).tolist(), hashlib.sha256(raw).hexdigest()


def expected(paths: dict[str, Path]) -> dict[tuple[str, int], tuple[list[list[int]], str]]:
    """Each (model, input) as ``memplan.load`` of the model answers in this process."""
    found = {}
    for name in MODELS:
        model = memplan.load(paths[name], progress=False)
        with torch.no_grad():
            for i, ids in enumerate(INPUTS):
                found[name, i] = summary(model(torch.tensor(ids)).logits)
        model.memplan.close()
    return found


def metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise KeyError(f"{name}{labels} not in /metrics")


def test_concurrent_requests_each_get_what_their_model_computes(served: Served) -> None:
    want = expected(served.paths)
    jobs = [(name, i) for _ in range(10) for name in MODELS for i in range(len(INPUTS))][:80]

    def send(job: tuple[str, int]) -> tuple[str, int, int, Any]:
        name, i = job
        return (name, i, *served.forward(name, INPUTS[i]))

    before = served.request("GET", "/metrics")[1]
    with ThreadPoolExecutor(8) as pool:  # 8 clients x 10 requests, over the three models
        answers = list(pool.map(send, jobs))
    assert [status for _, _, status, _ in answers] == [200] * 80, [a for a in answers if a[2] != 200][:1]
    for name, i, _, body in answers:
        assert body["model"] == name and body["shape"] == [len(INPUTS[i]), len(INPUTS[i][0]), 512]
        assert (body["argmax"], body["checksum"]) == want[name, i], (name, i)
    assert {body["tier"] for *_, body in answers} <= {"gpu", "host"}  # never run from disk
    for name in MODELS:  # one at a time: nothing leased, so each moves up to the GPU
        status, body = served.forward(name, INPUTS[0])
        assert status == 200 and body["tier"] == "gpu"

    text = served.request("GET", "/metrics")[1]
    sent = {name: sum(1 for n, _ in jobs if n == name) + 1 for name in MODELS}
    for name in MODELS:
        count = "memplan_request_seconds_count"
        assert metric(text, count, model=name) - metric(before, count, model=name) == sent[name]
        assert metric(text, "memplan_model_loads_total", model=name) == 1  # loaded once, however many asked
        on = [metric(text, "memplan_model_tier", model=name, tier=t) for t in ("gpu", "host", "disk")]
        assert sorted(on) == [0, 0, 1]
    # The GPU holds two of the three: serving all three moved some up and others down.
    assert sum(metric(text, "memplan_model_promotions_total", model=n) for n in MODELS) >= 1
    assert sum(metric(text, "memplan_model_demotions_total", model=n) for n in MODELS) >= 1
    assert metric(text, "memplan_load_seconds", model="small", strategy="full") > 0


def test_an_unknown_model_is_404_naming_it_and_the_server_keeps_serving(served: Served) -> None:
    status, body = served.forward("no-such-model", [[1, 2]])
    assert status == 404 and body["entry"] == "no-such-model" and "no-such-model" in body["error"]
    assert body["models"] == ["small", "medium", "large", "huge"]
    status, body = served.forward("small", INPUTS[0])
    assert status == 200 and body["model"] == "small"
    assert 'model="no-such-model"' not in served.request("GET", "/metrics")[1]  # no series for it


def test_a_model_no_tier_holds_is_507_with_the_shortfall(served: Served) -> None:
    status, body = served.forward("huge", [[1, 2, 3]])
    assert status == 507 and body["type"] == "DoesNotFit", body
    assert body["device"] == "cuda:0" and body["needed"] > body["available"]
    assert "huge" in body["error"]
    assert served.forward("small", INPUTS[0])[0] == 200


def test_a_bad_body_is_400(served: Served) -> None:
    for bad in (b"not json", {"input_ids": []}, {"input_ids": [[1, 2], [3]]}, {"input_ids": [[1, -2]]}):
        status, body = served.request("POST", "/v1/models/small/forward", bad)
        assert status == 400 and body["type"] == "BadRequest", (bad, body)
    status, body = served.forward("small", [[512]])  # outside the vocabulary of 512
    assert status == 400 and "vocabulary" in body["error"]


def test_models_lists_each_model_and_its_tier(served: Served) -> None:
    served.forward("small", INPUTS[0])
    listed = {m["name"]: m for m in served.request("GET", "/v1/models")[1]["models"]}
    assert listed["small"]["loaded"] and listed["small"]["tier"] in ("gpu", "host")
    assert not listed["huge"]["loaded"] and listed["huge"]["tier"] is None
