"""`clipkit serve`: a real uvicorn server on 127.0.0.1, queried over HTTP by retrieval.Client and httpx,
answering as the library does, and refusing every kind of bad request with a clear 4xx."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from clipkit.config import ExperimentConfig
from clipkit.eval.embed_dir import embed_to_dir
from clipkit.eval.encoders import load_encoder
from clipkit.model import create_model
from clipkit.train.checkpoint import save_checkpoint
from retrieval import Client, RetrievalIndex, ServiceError
from retrieval.encode import encode_texts
from retrieval.served import IndexSource, ServedIndex
from retrieval.service import MAX_K, MAX_UPLOAD_BYTES, create_app
from tests.conftest import tiny_model_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def toy_index(toy_shards, tmp_path_factory) -> tuple[Path, Path]:
    """(index folder, checkpoint): the toy held-out images embedded by a tiny model, indexed exactly."""
    root = tmp_path_factory.mktemp("serve")
    config = ExperimentConfig(model=tiny_model_config())
    checkpoint = save_checkpoint(root / "model.pt", create_model(config.model).eval(), config)
    embed_to_dir(load_encoder(str(checkpoint)), "image", toy_shards.shard_pattern("eval"), root / "emb",
                 batch_size=32, progress=False)
    RetrievalIndex.build_from_embeddings(root / "emb", kind="exact").save(root / "toy")
    return root / "toy", checkpoint


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """``app`` served by uvicorn on 127.0.0.1 in a thread; yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def service(toy_index) -> Iterator[str]:
    """The toy index (with its model) and a 16-d index of random vectors (no model), served."""
    folder, checkpoint = toy_index
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    sources = {
        "toy": IndexSource(lambda _: ServedIndex(RetrievalIndex.load(folder, mmap=True), load_encoder(str(checkpoint))),
                           folder),
        "plain": IndexSource(lambda _: ServedIndex(
            RetrievalIndex.build(vectors, [{"n": i} for i in range(50)], kind="exact"), None)),
    }
    with running(create_app(sources)) as url:
        yield url


def first_eval_image(toy_shards) -> tuple[str, bytes]:
    """(key, JPEG bytes) of the first held-out sample."""
    with tarfile.open(toy_shards.eval_shards[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        return member.name.rsplit(".", 1)[0], tar.extractfile(member).read()


def test_queries_answer_as_the_library_does(service, toy_index, toy_shards):
    folder, checkpoint = toy_index
    index, model = RetrievalIndex.load(folder), load_encoder(str(checkpoint))
    with Client(service) as client:
        assert client.health() == {"status": "ok", "indexes": ["plain", "toy"]}
        listed = {entry["name"]: entry for entry in client.indexes()}
        assert listed["toy"]["vectors"] == len(index) and listed["toy"]["text_and_image_queries"]
        assert not listed["plain"]["text_and_image_queries"]

        hits = client.search(text="a red circle", index="toy", k=5)
        expected = index.search_text("a red circle", model, k=5)
        assert [h.id for h in hits] == [h.id for h in expected]
        assert [h.score for h in hits] == pytest.approx([h.score for h in expected], abs=1e-6)
        assert client.item("toy", hits[0].id) == expected[0].metadata

        query = encode_texts(model, ["a blue square"])[0]
        by_vector = client.search(vector=query.tolist(), index="toy", k=3)
        assert [h.id for h in by_vector] == [h.id for h in index.search_vectors(query, 3)[0]]

        key, jpeg = first_eval_image(toy_shards)
        by_image = client.search(image=jpeg, index="toy", k=3)
        assert by_image[0].metadata["key"] == key and by_image[0].score == pytest.approx(1.0, abs=1e-5)

        more_like_it, expected = client.search(item=by_image[1].id, index="toy", k=5), index.search_item(by_image[1].id, k=5)
        assert [h.id for h in more_like_it] == [h.id for h in expected] and expected[0].id == by_image[1].id
        assert [h.score for h in more_like_it] == pytest.approx([h.score for h in expected], abs=1e-6)
        assert client.search(item=7, index="plain", k=3)[0].id == 7  # a vector-only index answers items too

        circles = client.search(text="a red circle", index="toy", k=4, where={"shape": "circle"})
        assert len(circles) == 4 and all(hit.metadata["shape"] == "circle" for hit in circles)
        filtered_image = client.search(image=jpeg, index="toy", k=2, where={"key": key})
        assert [hit.metadata["key"] for hit in filtered_image] == [key]


def test_concurrent_queries_are_answered_together_and_alike(service, toy_index):
    """24 requests at once (text, vector and a bad one): fewer batches than queries, each answer the
    library's, the bad vector refused alone."""
    folder, checkpoint = toy_index
    index, model = RetrievalIndex.load(folder), load_encoder(str(checkpoint))
    texts = [f"a {colour} {shape}" for colour in ("red", "green", "blue", "yellow") for shape in ("circle", "star")]
    vectors = encode_texts(model, ["a purple square", "an orange triangle"])
    before = batch_counts(service)

    async def ask_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=service, timeout=60) as http:
            requests = [http.post("/search", json={"index": "toy", "text": text, "k": 3 + i % 3})
                        for i, text in enumerate(texts * 2)]
            requests += [http.post("/search", json={"index": "toy", "vector": v.tolist(), "k": 4}) for v in vectors]
            requests += [http.post("/search", json={"index": "toy", "vector": [0.5] * 7})]
            return await asyncio.gather(*requests)

    responses = asyncio.run(ask_all())
    assert [r.status_code for r in responses] == [200] * 18 + [400]
    for i, (text, response) in enumerate(zip(texts * 2, responses)):
        expected = index.search_text(text, model, k=3 + i % 3)
        assert [h["id"] for h in response.json()["hits"]] == [h.id for h in expected]
        assert [h["score"] for h in response.json()["hits"]] == pytest.approx([h.score for h in expected], abs=1e-5)
    for vector, response in zip(vectors, responses[16:18]):
        assert [h["id"] for h in response.json()["hits"]] == [h.id for h in index.search_vectors(vector, 4)[0]]
    assert "dimension 7" in responses[-1].text
    queries, batches = (after - earlier for after, earlier in zip(batch_counts(service), before))
    assert queries == 19 and batches < queries
    assert max(r.json()["batch"] for r in responses[:18]) > 1


def batch_counts(url: str) -> tuple[float, float]:
    """(queries, batches) the service has answered so far, from its Prometheus metrics."""
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in httpx.get(f"{url}/metrics").text.splitlines()
              if line.startswith("clipkit_serve_batch_queries_")}
    return values["clipkit_serve_batch_queries_sum"], values["clipkit_serve_batch_queries_count"]


def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_answering(service, toy_shards):
    _, jpeg = first_eval_image(toy_shards)
    cases = [
        ({"json": {"index": "plain", "vector": [0.1] * 15}}, 400, "dimension 15"),
        ({"json": {"index": "toy", "text": "a red circle", "k": 10**6}}, 422, f"less than or equal to {MAX_K}"),
        ({"json": {"index": "nope", "text": "x"}}, 404, "no index named 'nope'"),
        ({"json": {"index": "../../etc/passwd", "text": "x"}}, 404, "no index named"),
        ({"json": {"index": "plain", "text": "a red circle"}}, 400, "vector and item queries only"),
        ({"json": {"index": "toy", "text": "a", "vector": [0.0] * 16}}, 422, "exactly one of text, vector and item"),
        ({"json": {"index": "toy", "item": 999_999}}, 404, "has no item 999999"),
        ({"json": {"index": "toy", "item": -1}}, 422, "item: Input should be greater than or equal to 0"),
        ({"json": {"text": "a red circle"}}, 400, "several indexes are served"),
        ({"json": {"index": "toy", "text": "x", "where": {"shape": ["circle"]}}}, 422, "where"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "JSON"),
        ({"content": b'{"index": "plain", "vector": [NaN]}', "headers": {"content-type": "application/json"}},
         422, "finite"),
    ]
    with httpx.Client(base_url=service, timeout=60) as http:
        for request, status, message in cases:
            response = http.post("/search", **request)
            assert response.status_code == status, (request, response.text)
            assert message in response.text, (request, response.text)
        uploads = [
            ({"file": ("q.jpg", b"not an image at all")}, {"index": "toy"}, 400, "not a decodable image"),
            ({"file": ("q.jpg", jpeg[: len(jpeg) // 3])}, {"index": "toy"}, 400, "not a decodable image"),
            ({"file": ("q.jpg", jpeg)}, {"index": "toy", "where": "{bad"}, 422, "where must be a JSON object"),
            ({"file": ("big.jpg", b"\0" * (MAX_UPLOAD_BYTES + 1))}, {"index": "toy"}, 413, "over the limit"),
        ]
        for files, form, status, message in uploads:
            response = http.post("/search/image", files=files, data=form)
            assert response.status_code == status, (form, response.text)
            assert message in response.text
        assert http.get("/indexes/toy/items/123456").status_code == 404
        assert http.get("/indexes/nope/items/0").status_code == 404
        assert http.get("/health").json()["status"] == "ok"
        metrics = http.get("/metrics").text
    assert 'status="5' not in metrics
    assert 'clipkit_serve_requests_total{route="/search",status="422"}' in metrics
    with pytest.raises(ServiceError, match="404: no index named 'nope'"):
        Client(service).search(text="x", index="nope")


SKIMAGE_FILES = ("camera.png", "logo.png", "coffee.png", "horse.png", "rocket.jpg", "no_time_for_that_tiny.gif")


def test_real_photographs_of_any_size_and_mode_are_answered_as_the_library_answers(service, toy_index):
    """scikit-image's photographs as uploads: grey, RGBA, 1-bit, JPEG, an animated GIF, and a sliver
    of 37 × 301 pixels; each answered 200 with the hits the library gives for the same bytes."""
    import io

    import skimage
    from PIL import Image

    folder, checkpoint = toy_index
    index, model = RetrievalIndex.load(folder), load_encoder(str(checkpoint))
    photos = {name: (Path(skimage.__file__).parent / "data" / name).read_bytes() for name in SKIMAGE_FILES}
    sliver = io.BytesIO()
    Image.open(io.BytesIO(photos["coffee.png"])).convert("RGB").crop((100, 50, 137, 351)).save(sliver, "JPEG")
    photos["sliver.jpg"] = sliver.getvalue()
    with Client(service) as client:
        for name, data in photos.items():
            hits = client.search(image=data, index="toy", k=5)
            assert [hit.id for hit in hits] == [hit.id for hit in index.search_file(data, model, "image", k=5)], name


def test_metrics_give_seconds_per_stage(service):
    with Client(service) as client:
        client.search(text="a green star", index="toy", k=2)
        client.search(vector=[0.25] * 16, index="plain", k=2)
    metrics = httpx.get(f"{service}/metrics").text
    counts = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
              for line in metrics.splitlines() if line.startswith("clipkit_serve_stage_seconds_count")}
    assert counts['stage="encode"'] >= 2 and counts['stage="search"'] >= 2 and counts['stage="metadata"'] >= 2
    assert 'clipkit_serve_requests_total{route="/search",status="200"}' in metrics


def test_an_items_media_is_read_back_from_its_shard(service, toy_shards):
    key, jpeg = first_eval_image(toy_shards)
    with Client(service) as client:
        (hit,) = client.search(image=jpeg, index="toy", k=1)
    assert hit.metadata["media"]["type"] == "jpg" and hit.metadata["media"]["size"] == len(jpeg)  # from embed
    response = httpx.get(f"{service}/indexes/toy/items/{hit.id}/media")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content == jpeg
    not_a_video = httpx.get(f"{service}/indexes/toy/items/{hit.id}/media", params={"frame": 0.5})
    assert not_a_video.status_code == 400 and "not a video" in not_a_video.json()["detail"]
    assert httpx.get(f"{service}/indexes/toy/items/{hit.id}/media", params={"frame": 2}).status_code == 422
    missing = httpx.get(f"{service}/indexes/plain/items/3/media")
    assert missing.status_code == 404 and "names no source and key" in missing.json()["detail"]
    assert httpx.get(f"{service}/indexes/toy/items/99999/media").status_code == 404


def test_a_rebuilt_index_is_swapped_in_whole_while_queries_keep_answering(tmp_path):
    """Three clients query without pause while the folder is rebuilt (50 → 60 → 70 → a damaged
    version → 90 vectors): every request is answered, each from one version, and the damaged version
    is refused with the one before still served."""
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(90, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    folder = tmp_path / "live"

    def save(count: int, directory: Path = folder) -> None:
        metadata = [{"n": i, "version": count} for i in range(count)]
        RetrievalIndex.build(vectors[:count], metadata, kind="exact").save(directory)

    save(50)
    sources = {"live": IndexSource(lambda _: ServedIndex(RetrievalIndex.load(folder, mmap=True), None), folder)}
    statuses: list[int] = []
    versions: list[set[int]] = []
    stop = threading.Event()

    def query_without_pause() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                response = http.post(f"{url}/search", json={"vector": vectors[0].tolist(), "k": 8})
                statuses.append(response.status_code)
                if response.status_code == 200:
                    versions.append({hit["metadata"]["version"] for hit in response.json()["hits"]})

    def served_count(client: Client, count: int) -> None:
        """Wait until version ``count`` is served and has answered the clients."""
        deadline = time.monotonic() + 30
        while client.indexes()[0]["vectors"] != count or not any(seen == {count} for seen in versions[-20:]):
            assert time.monotonic() < deadline, f"version {count} was not swapped in"
            time.sleep(0.05)

    with running(create_app(sources, watch_seconds=0.1)) as url, Client(url) as client:
        threads = [threading.Thread(target=query_without_pause) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            served_count(client, 50)
            for count in (60, 70):
                save(count)
                served_count(client, count)
            save(80, tmp_path / "damaged")
            with open(tmp_path / "damaged" / "index.faiss", "r+b") as damaged:
                damaged.seek(-64, os.SEEK_END)
                damaged.write(b"\xff" * 64)
            os.rename(folder, tmp_path / "aside")
            os.rename(tmp_path / "damaged", folder)
            deadline = time.monotonic() + 30
            while 'clipkit_serve_reloads_total{index="live",outcome="failed"} 1.0' not in httpx.get(f"{url}/metrics").text:
                assert time.monotonic() < deadline, "the watcher did not try the damaged version"
                time.sleep(0.05)
            with pytest.raises(ServiceError, match="409: index 'live' kept the version it served.*checksum"):
                client.reload("live")
            assert client.indexes()[0]["vectors"] == 70
            save(90)
            served_count(client, 90)
            assert client.search(item=85, k=1)[0].metadata == {"n": 85, "version": 90}
            assert client.reload() == ["live"]
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    assert len(statuses) > 50 and set(statuses) == {200}
    assert all(len(seen) == 1 for seen in versions)  # no answer mixes two versions
    assert {50, 60, 70, 90} <= set.union(*versions)


def browser():
    """Headless chromium through Selenium, or a skip where the browser is not installed (.ci/run
    installs it and sets CLIPKIT_REQUIRE_BROWSER, so CI never skips)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CLIPKIT_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required here (apt-get install chromium chromium-driver)")
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def test_the_page_searches_in_a_real_browser(service, toy_index, toy_shards, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    folder, checkpoint = toy_index
    index, model = RetrievalIndex.load(folder), load_encoder(str(checkpoint))
    key, jpeg = first_eval_image(toy_shards)
    driver = browser()
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(service)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "index")).options) == 2)
        Select(driver.find_element(By.ID, "index")).select_by_value("toy")

        def clear_status() -> None:
            """Before an action: its results are then the first " results for " the status shows (two
            searches can print the same status, down to the tenth of a millisecond)."""
            driver.execute_script("document.getElementById('status').textContent = ''")

        def results() -> list:
            wait.until(lambda d: " results for " in d.find_element(By.ID, "status").text)
            return driver.find_elements(By.CSS_SELECTOR, "#results .hit")

        driver.find_element(By.ID, "query").send_keys("a red circle")
        driver.find_element(By.ID, "go").click()
        cards = results()
        expected = index.search_text("a red circle", model, k=12)
        assert [int(card.get_attribute("data-id")) for card in cards] == [hit.id for hit in expected]
        assert expected[0].metadata["caption"] in cards[0].text
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))

        clear_status()
        driver.find_element(By.ID, "filter").send_keys("shape=circle")
        driver.find_element(By.ID, "go").click()
        circles = results()
        assert circles and all("shape: circle" in card.text for card in circles)

        driver.find_element(By.ID, "filter").clear()
        upload = tmp_path / "query.jpg"
        upload.write_bytes(jpeg)
        clear_status()
        driver.find_element(By.ID, "upload").send_keys(str(upload))
        by_image = results()
        assert f"key: {key}" in by_image[0].text and by_image[0].text.startswith("1.000")

        second = int(by_image[1].get_attribute("data-id"))
        clear_status()
        by_image[1].find_element(By.CLASS_NAME, "similar").click()
        similar = results()
        assert int(similar[0].get_attribute("data-id")) == second  # an item is most similar to itself

        Select(driver.find_element(By.ID, "index")).select_by_value("plain")
        driver.find_element(By.ID, "query").send_keys(" again")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: "vector and item queries only" in d.find_element(By.ID, "status").text)
    finally:
        driver.quit()


def test_clipkit_serve_binds_localhost_and_sigterm_drains_a_request_in_flight(toy_index, tmp_path):
    """The folder rebuilt is swapped in (keeping the model, which embedded it too). A request whose
    body is half sent when SIGTERM arrives is still answered; new connections are not taken; then the
    process exits 0."""
    folder = tmp_path / "toy"
    shutil.copytree(toy_index[0], folder)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "clipkit", "serve", str(folder), "--port", str(port),
                                "--watch", "0.2"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        with Client(url) as client:
            assert len(client.search(text="a red circle", k=3)) == 3  # one index: no name needed
            rebuilt = RetrievalIndex.load(folder)
            rebuilt.remove([0, 1, 2])
            rebuilt.save(folder)
            deadline = time.monotonic() + 60
            while client.indexes()[0]["vectors"] != len(rebuilt):
                assert time.monotonic() < deadline, "the rebuilt folder was not swapped in"
                time.sleep(0.1)
            assert 0 not in {hit.id for hit in client.search(item=3, k=1000)}
            assert len(client.search(text="a red circle", k=3)) == 3

        body = json.dumps({"text": "a blue star", "k": 4}).encode()
        in_flight = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        in_flight.putrequest("POST", "/search")
        in_flight.putheader("content-type", "application/json")
        in_flight.putheader("content-length", str(len(body)))
        in_flight.endheaders()
        in_flight.send(body[:9])
        time.sleep(0.5)  # the server has the request's head: it is in flight
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert process.poll() is None, "the server exited with a request in flight"
        with pytest.raises(httpx.TransportError):  # it takes no new connections while it drains
            httpx.get(f"{url}/health", timeout=2)
        in_flight.send(body[9:])
        response = in_flight.getresponse()
        assert response.status == 200 and len(json.loads(response.read())["hits"]) == 4
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert f"serving on http://127.0.0.1:{port}" in stdout
    assert stdout.count(f"toy: {len(rebuilt) + 3} × ") == stdout.count(f"toy: {len(rebuilt)} × ") == 1
