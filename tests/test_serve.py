"""The reward service (issue 25) over real HTTP on loopback, with tiny models (random weights).

One Serve application for the whole module (two model deployments and the front, on the session's
local Ray), required to check a token: values equal in-process scoring, concurrent clients all
answered with dynamic batching observed, every bad input a 4xx naming the problem with the service
answering afterwards, the token refused and accepted, and the ``RewardPool`` backend over HTTP.
"""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("ray.serve")

MODELS = ["clip:tiny", "pickscore:tiny"]
TOKEN = "test-token-0123456789"
ENSEMBLE = {"name": "mean2", "members": MODELS, "kind": "mean"}
SETS = {
    "two red cubes": ["a red cube", "three red cubes"],
    "a cat on a sofa": ["two cats on a sofa", "a dog on a sofa", "a cat under a sofa"],
}


def png(seed: int, size: int = 32) -> bytes:
    from PIL import Image

    arr = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory, s3):
    """(url, cfg, local image root): the reward service on 127.0.0.1 for this module, reading images
    under a local folder and under s3://bucket/serve_images (moto); Serve shut down after."""
    from ray import serve

    from tn_ray.serve.app import start
    from tn_ray.serve.config import ServeConfig

    root = tmp_path_factory.mktemp("image_root")
    (root / "ok.png").write_bytes(png(7))
    s3fs, uri = s3
    for key in ("serve_images/ok.png", "serve_images-evil/ok.png", "elsewhere/ok.png"):
        with s3fs.open_output_stream(f"bucket/{key}") as f:
            f.write(png(7))
    cfg = ServeConfig(
        port=free_port(),
        require_token=True,
        models=MODELS,
        # 0.25 CPU per replica: the commands' tests below need a whole CPU free for Ray Data's tasks
        replica={"num_cpus": 0.25, "max_batch_size": 64, "batch_wait_timeout_s": 0.05},
        ensembles=[ENSEMBLE],
        image_roots=[str(root), uri("serve_images")],
        limits={"max_pairs": 16, "max_image_bytes": 64 * 1024, "max_request_bytes": 1024 * 1024},
    )
    url = start(cfg, token=TOKEN)
    yield url, cfg, root
    serve.shutdown()


@pytest.fixture(scope="module")
def local_workers():
    from tn_ray.scoring.workers import RewardWorker

    return {m: RewardWorker(m) for m in MODELS}


def post(url: str, path: str, payload, token: str | None = TOKEN, raw: bytes | None = None):
    """(status, JSON body) of a POST; never raises on 4xx/5xx."""
    data = raw if raw is not None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def in_process(local_workers, images: list[bytes], prompts: list[str]) -> dict[str, np.ndarray]:
    """Every column computed in-process: RewardWorker rows, then the one reward-columns function."""
    from tn_ray.prompts.contrast import texts_for
    from tn_ray.scoring.matrix import pad_rows
    from tn_ray.textnorm.columns import EnsembleSpec, SetParams, reward_columns

    texts = texts_for(prompts, SETS, "test sets")
    values = {m: pad_rows(w.score(images, texts)) for m, w in local_workers.items()}
    return reward_columns(values, SetParams(), [EnsembleSpec(**ENSEMBLE)])


def request(seed: int, n: int = 4) -> tuple[list[bytes], list[str]]:
    prompts = list(SETS)
    return [png(seed * 100 + i) for i in range(n)], [prompts[(seed + i) % 2] for i in range(n)]


COLUMNS = ["clip:tiny", "textnorm(clip:tiny)", "pickscore:tiny", "textnorm(pickscore:tiny)", "mean2"]


def test_scores_equal_in_process_scoring(service, local_workers):
    from tn_ray.client import RewardClient

    url, _, _ = service
    images, prompts = request(1, n=6)
    out = RewardClient(url, TOKEN).score(images, prompts, reward=COLUMNS, contrast=SETS)
    want = in_process(local_workers, images, prompts)
    assert out["reward"] == "clip:tiny" and out["n"] == 6 and out["contrast"] == "inline"
    assert set(out["columns"]) == set(COLUMNS)
    for col in COLUMNS:
        np.testing.assert_allclose(out["columns"][col], want[col], rtol=1e-5, err_msg=col)
    assert out["revisions"] == {"clip:tiny": "random-init", "pickscore:tiny": "random-init"}
    # spellings are canonicalized, a raw column needs no sets, and pairs are the same as images + prompts
    status, raw = post(url, "/v1/score", {"pairs": [{"image": base64.b64encode(im).decode(), "prompt": p}
                                                    for im, p in zip(images, prompts)], "reward": "clip:tiny"})
    assert status == 200, raw
    np.testing.assert_allclose(raw["scores"], want["clip:tiny"], rtol=1e-5)
    assert raw["revisions"] == {"clip:tiny": "random-init"}


def test_named_source_and_image_path(service, local_workers):
    """``contrast: rules`` builds the sets in the service; a path under an image root is read."""
    from tn_ray.prompts.contrast import sets_for, texts_for
    from tn_ray.textnorm.equations import textnorm

    url, _, root = service
    prompts = ["two red cubes"]
    status, out = post(url, "/v1/score", {"images": [{"path": str(root / "ok.png")}], "prompts": prompts,
                                          "reward": "textnorm(clip:tiny)", "contrast": "rules"})
    assert status == 200, out
    texts = texts_for(prompts, sets_for("rules", prompts), "rules")
    want = textnorm(np.asarray(local_workers["clip:tiny"].score([png(7)], texts)), 1.0)
    np.testing.assert_allclose(out["scores"], want, rtol=1e-5)
    assert out["contrast"] == "rules"


def test_image_uri_under_a_store_root_scores_as_its_bytes(service, s3, local_workers):
    """``{"path": "s3://..."}`` under a URI image root is read through the root's store and scores as
    the same bytes sent inline; outside the root, traversal, a prefix trick or other options are
    each a 403 naming the problem, and the service answers afterwards. The client sends a URI as a path."""
    from tn_ray.client import RewardClient
    from tn_ray.scoring.service_pool import ServicePool

    url, _, _ = service
    _, uri = s3
    inline = base64.b64encode(png(7)).decode()
    ok, bare = uri("serve_images/ok.png"), uri("serve_images/ok.png").split("?")[0]
    status, out = post(url, "/v1/score", {"images": [{"path": ok}, {"path": bare}, inline],
                                          "prompts": ["two red cubes"] * 3, "reward": "clip:tiny"})
    assert status == 200, out
    want = local_workers["clip:tiny"].score([png(7)], [["two red cubes"]])[0][0]
    np.testing.assert_allclose(out["scores"], [want] * 3, rtol=1e-5)
    query = ok.split("?")[1]
    for path, named in [
        (uri("elsewhere/ok.png"), "outside the image roots"),
        (f"s3://bucket/serve_images/../elsewhere/ok.png?{query}", "the segment '..'"),
        (f"s3://bucket/serve_images/%2E%2E/elsewhere/ok.png?{query}", "the segment '..'"),
        (uri("serve_images-evil/ok.png"), "outside the image roots"),
        ("s3://bucket/serve_images/ok.png?endpoint_override=169.254.169.254:80&scheme=http", "options"),
        (uri("serve_images/missing.png"), "no image object at"),
    ]:
        status, body = post(url, "/v1/score", {"images": [{"path": path}], "prompts": ["two red cubes"],
                                               "reward": "clip:tiny"})
        assert status in (400, 403) and named in body["error"] and body["error"].startswith("images[0]: "), body
    client = RewardClient(url, TOKEN)
    assert client.rewards()["image_uris"] is True
    np.testing.assert_allclose(client.score([ok], ["two red cubes"], reward="clip:tiny")["scores"], [want], rtol=1e-5)
    pool = ServicePool("clip:tiny", url, token=TOKEN)
    try:
        rows = pool.score([ok, png(7)], [["two red cubes"]] * 2)
        np.testing.assert_allclose([r[0] for r in rows], [want] * 2, rtol=1e-5)
    finally:
        pool.shutdown()


def test_concurrent_clients_all_answered_and_batched(service, local_workers):
    from tn_ray.client import RewardClient

    url, _, _ = service
    client = RewardClient(url, TOKEN)
    before = client.stats()
    threads, per_thread = 8, 10
    answers: dict[tuple[int, int], dict] = {}
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            for k in range(per_thread):
                images, prompts = request(t * per_thread + k)
                answers[(t, k)] = client.score(images, prompts, reward=COLUMNS, contrast=SETS)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert not errors, errors[:3]
    assert len(answers) == threads * per_thread
    for (t, k), out in list(answers.items())[:: 7]:  # a sample: in-process scoring costs time too
        want = in_process(local_workers, *request(t * per_thread + k))
        for col in COLUMNS:
            np.testing.assert_allclose(out["columns"][col], want[col], rtol=1e-5, err_msg=f"{(t, k)} {col}")
    after = client.stats()
    for m in MODELS:
        requests = after[m]["requests"] - before[m]["requests"]
        calls = after[m]["model_calls"] - before[m]["model_calls"]
        assert requests == threads * per_thread, (m, requests)
        assert calls < requests, f"{m}: no batching observed ({calls} model calls for {requests} requests)"
        print(f"\n{m}: {requests} requests from {threads} clients -> {calls} model calls")


@pytest.mark.parametrize(
    ("payload", "status", "named"),
    [
        ({"images": [base64.b64encode(b"hello, not an image").decode()], "prompts": ["two red cubes"],
          "reward": "clip:tiny"}, 400, "images[0]: not an image"),
        ({"images": ["@@not base64@@"], "prompts": ["two red cubes"], "reward": "clip:tiny"}, 400, "not an image"),
        ({"images": [base64.b64encode(png(3, size=200)).decode()], "prompts": ["two red cubes"],
          "reward": "clip:tiny"}, 413, "image too large"),
        ({"images": [base64.b64encode(png(3)).decode()] * 17, "prompts": ["two red cubes"] * 17,
          "reward": "clip:tiny"}, 413, "too many pairs"),
        ({"images": [base64.b64encode(png(3)).decode()], "prompts": ["two red cubes"], "reward": "clipp:tiny"},
         400, "unknown reward 'clipp:tiny'"),
        ({"images": [base64.b64encode(png(3)).decode()], "prompts": ["a prompt without a set"],
          "reward": "textnorm(clip:tiny)", "contrast": SETS}, 400, "have no contrastive set"),
        ({"images": [base64.b64encode(png(3)).decode()], "prompts": ["two red cubes"],
          "reward": "textnorm(clip:tiny)"}, 400, "needs contrastive sets"),
        ({"images": [base64.b64encode(png(3)).decode()], "prompts": ["two red cubes"],
          "reward": "textnorm(clip:tiny)", "contrast": "llm"}, 400, "'llm' is not served"),
        ({"images": [base64.b64encode(png(3)).decode()], "prompts": ["two red cubes"],
          "reward": "textnorm(clip:tiny)", "contrast": "/etc/passwd"}, 400, "unknown source"),
        ({"images": [{"path": "/etc/passwd"}], "prompts": ["two red cubes"], "reward": "clip:tiny"},
         403, "outside the image roots"),
        ({"images": [{"path": "http://example.com/x.png"}], "prompts": ["two red cubes"], "reward": "clip:tiny"},
         403, "URLs are never fetched"),
        ({"images": [base64.b64encode(png(3)).decode()], "prompts": ["a", "b"], "reward": "clip:tiny"},
         400, "1 images but 2 prompts"),
        ({"images": [base64.b64encode(png(3)).decode()], "prompts": ["two red cubes"]}, 400, "reward: missing"),
        ({"images": [], "prompts": [], "reward": "clip:tiny"}, 400, "no image"),
        ({"images": [base64.b64encode(png(3)).decode()], "prompts": ["x"], "reward": "clip:tiny", "extra": 1},
         400, "unknown field(s) ['extra']"),
    ],
    ids=["not-an-image", "not-base64", "image-too-large", "too-many-pairs", "unknown-reward", "prompt-without-set",
         "no-contrast", "llm-refused", "file-source-refused", "path-outside-roots", "url-refused", "length-mismatch",
         "no-reward", "empty", "unknown-field"],
)
def test_bad_input_is_a_4xx_naming_the_problem(service, payload, status, named):
    url, _, _ = service
    got, body = post(url, "/v1/score", payload)
    assert got == status, body
    assert named in body["error"], body


def test_bad_bodies_and_the_service_keeps_serving(service):
    from tn_ray.client import RewardClient

    url, _, _ = service
    got, body = post(url, "/v1/score", None, raw=b"{not json")
    assert got == 400 and "not JSON" in body["error"]
    got, body = post(url, "/v1/score", None, raw=b"[1, 2]")
    assert got == 400 and "JSON object" in body["error"]
    got, body = post(url, "/v1/score", None, raw=b" " * (1024 * 1024 + 1))
    assert got == 413 and "over the limit" in body["error"]
    got, body = post(url, "/v1/score_rows", {"model": "nope", "images": [], "texts": []})
    assert got == 400 and "unknown reward model 'nope'" in body["error"]
    # still serving: a good request after every bad one
    client = RewardClient(url, TOKEN)
    assert client.health() == {"status": "ok"}
    out = client.score([png(5)], ["two red cubes"], reward="clip:tiny")
    assert len(out["scores"]) == 1 and np.isfinite(out["scores"][0])


def test_token_refused_and_accepted(service):
    from tn_ray.client import RewardClient, ServiceError

    url, cfg, _ = service
    payload = {"images": [base64.b64encode(png(3)).decode()], "prompts": ["two red cubes"], "reward": "clip:tiny"}
    for token in (None, "wrong-token", TOKEN[:-1]):
        got, body = post(url, "/v1/score", payload, token=token)
        assert got == 401 and "token required" in body["error"]
    with pytest.raises(ServiceError, match="401"):
        RewardClient(url).rewards()
    got, body = post(url, "/v1/score", payload, token=TOKEN)
    assert got == 200, body
    info = RewardClient(url, TOKEN).rewards()
    assert info["columns"] == cfg.columns and info["revisions"]["clip:tiny"] == "random-init"


def test_reward_pool_backend_and_reward_fn(service, local_workers):
    """``reward: {service: URL}``: the ServicePool backend gives the rows of in-process actors, in submit order."""
    from tn_ray.client import RewardClient
    from tn_ray.scoring.service_pool import ServicePool

    url, _, _ = service
    images, prompts = request(3, n=5)
    texts = [[p, *SETS[p]] for p in prompts]
    pool = ServicePool("clip:tiny", url, token=TOKEN)
    try:
        pool.submit(images[:2], texts[:2])
        pool.submit(images[2:], texts[2:], chunk=1)
        first, second = pool.collect()
        want = local_workers["clip:tiny"].score(images, texts)
        for got, ref in zip(first + second, want):
            np.testing.assert_allclose(got, ref, rtol=1e-5)
        with pytest.raises(ValueError, match="not served"):
            pool.submit_embed(images, prompts)
    finally:
        pool.shutdown()
    with pytest.raises(ValueError, match="does not serve imagereward"):
        ServicePool("imagereward:random", url, token=TOKEN)
    # inside the cluster: the Serve handle (no HTTP), through the same factory as `reward.service`
    from tn_ray.scoring.service_pool import HandlePool, reward_pool

    handle_pool = reward_pool("clip:tiny", service="serve:tn_ray_rewards")
    assert isinstance(handle_pool, HandlePool)
    for got, ref in zip(handle_pool.score(images, texts, chunk=2), local_workers["clip:tiny"].score(images, texts)):
        np.testing.assert_allclose(got, ref, rtol=1e-5)
    with pytest.raises(ValueError, match="no Serve application 'nope'"):
        HandlePool("clip:tiny", "nope")
    reward_fn = RewardClient(url, TOKEN).reward_fn("textnorm(clip:tiny)", contrast=SETS)
    scores, info = reward_fn(images, prompts, [{} for _ in prompts])
    np.testing.assert_allclose(scores, in_process(local_workers, images, prompts)["textnorm(clip:tiny)"], rtol=1e-5)
    assert info["revisions"] == {"clip:tiny": "random-init"} and info["reward"] == "textnorm(clip:tiny)"


def test_a_replica_killed_mid_load_every_request_answered_once(service, local_workers):
    """A model replica killed while 4 clients score: Serve starts another; the requests it held fail
    with a 5xx that the client retries, so every request is answered, with the in-process values."""
    import time

    import ray

    from tn_ray.client import RewardClient

    url, _, _ = service
    client = RewardClient(url, TOKEN, retries=6)
    answers: dict[tuple[int, int], dict] = {}
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            for k in range(6):
                answers[(t, k)] = client.score(*request(1000 + t * 6 + k), reward=COLUMNS, contrast=SETS)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for w in workers:
        w.start()
    time.sleep(0.5)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if "reward0_clip_tiny" in a["name"] and a["name"].startswith("SERVE_REPLICA")]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    for w in workers:
        w.join(timeout=300)
    assert not errors, errors[:3]
    assert len(answers) == 24
    print(f"\nreplica killed mid-load: 24 requests answered, {client.retried} sent again by the client")
    for (t, k), out in answers.items():
        want = in_process(local_workers, *request(1000 + t * 6 + k))
        for col in COLUMNS:
            np.testing.assert_allclose(out["columns"][col], want[col], rtol=1e-5, err_msg=f"{(t, k)} {col}")


def test_run_evaluation_scores_through_the_service_as_in_process(service, local_workers, tmp_path, monkeypatch):
    """``reward: {service: URL}`` in a fine-tuning config: the evaluation's pools are the HTTP backend
    (token from TN_RAY_SERVE_TOKEN) and its reward column equals in-process scoring."""
    from tn_ray.prompts.contrast import texts_for
    from tn_ray.scoring.matrix import pad_rows
    from tn_ray.scoring.service_pool import ServicePool
    from tn_ray.textnorm.equations import textnorm
    from tn_ray.training.config import FineTuneConfig
    from tn_ray.training.evaluation import Evaluator

    url, _, _ = service
    monkeypatch.setenv("TN_RAY_SERVE_TOKEN", TOKEN)
    (tmp_path / "sets.json").write_text(json.dumps(SETS))
    prompts = list(SETS)
    cfg = FineTuneConfig.model_validate({
        "out": str(tmp_path / "run"),
        "reward": {"models": ["clip:tiny"], "use": "textnorm(clip:tiny)", "contrast": str(tmp_path / "sets.json"),
                   "service": url},
        "eval": {"prompts": prompts, "seeds": [0, 1]},
    })
    evaluator = Evaluator(cfg, prompts)
    images = [png(500 + i) for i in range(4)]  # (prompt, seed), prompt-major
    try:
        frame = evaluator.score(images)
        assert all(isinstance(p, ServicePool) for p in evaluator._pools.values()) and evaluator._pools
    finally:
        evaluator.close()
    texts = texts_for([prompts[i // 2] for i in range(4)], SETS, "sets")
    want = textnorm(pad_rows(local_workers["clip:tiny"].score(images, texts)), 1.0)
    got = frame[frame["reward"] == "textnorm(clip:tiny)"]["value"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)


# --- tn_ray's own commands through the service (issue 25, item 3) -------------------------------


def _gen(**kw) -> dict:
    return {"pipeline": "tiny", "num_inference_steps": 2, "height": 32, "width": 32, "pipeline_batch_size": 2,
            "batch_size": 2, "num_actors": 1, "cpus_per_actor": 0.25, **kw}


def _textnorm_in_process(local_workers, images: list, prompts: list[str]) -> np.ndarray:
    from tn_ray.scoring.matrix import pad_rows
    from tn_ray.textnorm.equations import textnorm

    rows = local_workers["clip:tiny"].score(images, [[p, *SETS[p]] for p in prompts])
    return rows, textnorm(pad_rows(rows), 1.0)


def test_bestofn_streams_its_scoring_through_the_service_as_in_process(service, local_workers, tmp_path, monkeypatch):
    """``service: URL`` in a best-of-n config: the streaming stage sends each batch's images to the
    service (no reward actor loads a model), the reward cache and score matrix hold the rows of
    in-process scoring, and the TextNorm column of rewards.parquet equals in-process TextNorm."""
    import pandas as pd

    from tn_ray.experiments.bestofn import BestOfNConfig, run
    from tn_ray.scoring.cache import RewardCache

    url, _, _ = service
    monkeypatch.setenv("TN_RAY_SERVE_TOKEN", TOKEN)
    (tmp_path / "sets.json").write_text(json.dumps(SETS))
    cfg = BestOfNConfig.model_validate({
        "out": str(tmp_path / "run"), "contrast": str(tmp_path / "sets.json"), "pools": [2], "top_k": [1],
        "models": ["clip:tiny"], "generation": _gen(samples_per_prompt=2), "scoring": {"batch_size": 2},
        "grids": False, "human_eval": None, "service": url,
    })
    run(cfg)
    rewards = pd.read_parquet(tmp_path / "run" / "rewards.parquet")
    assert len(rewards) == 4
    images = [open(p, "rb").read() for p in rewards["image"]]
    rows, want = _textnorm_in_process(local_workers, images, list(rewards["prompt"]))
    np.testing.assert_allclose(rewards["textnorm(clip:tiny)"], want, rtol=1e-5)
    np.testing.assert_allclose(rewards["clip:tiny"], [r[0] for r in rows], rtol=1e-5)
    cache = RewardCache(tmp_path / "run" / "cache", "clip:tiny").frame()
    assert len(cache) == sum(len(r) for r in rows) and not cache.duplicated(["image_key", "text"]).any()
    with pytest.raises(ValueError, match="serve:<Serve application name>"):
        BestOfNConfig.model_validate({"service": "127.0.0.1:8000"})


def test_rwr_scores_its_generated_images_through_the_service_as_in_process(service, local_workers, tmp_path,
                                                                        monkeypatch):
    """RWR's data (``reward.service``): every generated image's reward (rewards.parquet) and the kept
    top-k (data.parquet) equal in-process scoring; the cache rows come from the service
    (``score_matrices(service=...)``); the Serve handle (``serve:<app>``) gives the same matrix."""
    import pandas as pd

    from tn_ray.diffusion.generation import read_manifest
    from tn_ray.scoring.batch_scoring import score_matrices
    from tn_ray.storage import Store
    from tn_ray.training.rwr import RwrConfig, prepare_data, score_items

    url, _, _ = service
    monkeypatch.setenv("TN_RAY_SERVE_TOKEN", TOKEN)
    (tmp_path / "sets.json").write_text(json.dumps(SETS))
    prompts = list(SETS)
    cfg = RwrConfig.model_validate({
        "out": str(tmp_path / "run"), "prompts": prompts, "policy": {"pipeline": "tiny"},
        "reward": {"models": ["clip:tiny"], "use": "textnorm(clip:tiny)", "contrast": str(tmp_path / "sets.json"),
                   "service": url},
        "generation": _gen(samples_per_prompt=3), "top_k": 2, "eval": {"enabled": False},
        "scoring": {"batch_size": 2},
    })
    data = prepare_data(cfg, prompts)
    store = Store(str(tmp_path / "run" / "generation"))
    manifest = read_manifest(store).sort_values(["prompt_id", "sample"]).reset_index(drop=True)
    manifest["image"] = [store.uri(p) for p in manifest["path"]]
    everything = pd.read_parquet(tmp_path / "run" / "rewards.parquet").sort_values(["prompt_id", "sample"])
    images = [open(p, "rb").read() for p in manifest["image"]]
    rows, want = _textnorm_in_process(local_workers, images, list(manifest["prompt"]))
    np.testing.assert_allclose(everything["reward"], want, rtol=1e-5)
    assert len(data) == 4
    by_image = dict(zip(manifest["image"], want))
    np.testing.assert_allclose(data["reward"], [by_image[p] for p in data["image"]], rtol=1e-5)
    # the same items through the Serve handle, into a fresh cache
    items = score_items(manifest, {p: [p, *SETS[p]] for p in prompts})
    stats: dict = {}
    handle = score_matrices(items, ["clip:tiny"], tmp_path / "cache2", service="serve:tn_ray_rewards", stats=stats)
    assert stats["clip:tiny"]["computed"] == sum(len(r) for r in rows)
    for got, ref in zip(handle["clip:tiny"].values, rows):
        np.testing.assert_allclose(got[: len(ref)], ref, rtol=1e-5)


def test_ddpo_end_to_end_rewards_through_the_service_equal_in_process(service, tmp_path, monkeypatch):
    """A DDPO run of 2 epochs (tiny pipeline, 4 samples per epoch, seed 0) with ``reward.service``
    and the same run with in-process reward actors: every epoch's sampled rewards are equal
    (relative 1e-5), so the two runs take the same steps."""
    import pandas as pd
    import torch

    from tn_ray.scoring.service_pool import ServicePool
    from tn_ray.training import ddpo
    from tn_ray.training.loop import Trainer, WorkerContext

    url, _, _ = service
    monkeypatch.setenv("TN_RAY_SERVE_TOKEN", TOKEN)
    (tmp_path / "sets.json").write_text(json.dumps(SETS))
    rewards = {}
    for name, extra in (("service", {"service": url}), ("in_process", {})):
        cfg = ddpo.DDPOConfig.model_validate({
            "out": str(tmp_path / name), "prompts": list(SETS), "seed": 0, "max_steps": 2,
            "policy": {"pipeline": "tiny", "lora": {"rank": 4}}, "optimizer": {"lr": 2e-2},
            "reward": {"models": ["clip:tiny"], "use": "textnorm(clip:tiny)",
                       "contrast": str(tmp_path / "sets.json"), **extra},
            "sample": {"num_steps": 2, "batch_size": 4, "num_batches_per_epoch": 1},
            "train": {"batch_size": 4, "stat_min_count": 2}, "eval": {"enabled": False},
            "checkpoint": {"every": 2}, "logging": {"progress_bar": False, "tensorboard": False},
            "scoring": {"cpus_per_actor": 0.25, "num_actors": 1},
        })
        data = ddpo.prepare(cfg)
        assert isinstance(data.pools["clip:tiny"], ServicePool) == (name == "service")
        try:
            torch.manual_seed(0)
            Trainer(cfg, ddpo.DDPO, data, WorkerContext(0, 1, torch.device("cpu"), cfg.out)).run()
        finally:
            ddpo.release(data)
        frames = sorted((tmp_path / name / "samples").glob("epoch-*.parquet"))
        assert len(frames) == 2
        rewards[name] = pd.concat([pd.read_parquet(f) for f in frames])["reward"].to_numpy()
    np.testing.assert_allclose(rewards["service"], rewards["in_process"], rtol=1e-5)


# --- the config, no Serve -------------------------------------------------------------------


def test_config_refuses_what_the_service_must_not_do(tmp_path):
    from tn_ray.config import ConfigError, validate
    from tn_ray.serve.config import ServeConfig

    base = {"models": ["clip:tiny"]}
    for extra, named in [
        ({"contrast_sources": ["llm"]}, "never calls an outside API"),
        ({"contrast_sources": ["sets.json"]}, "unknown contrastive-set source"),
        ({"image_roots": [str(tmp_path / "missing")]}, "is not a folder"),
        ({"replica": {"max_batch_size": 8}}, "below limits.max_pairs"),
        ({"replica": {"min_replicas": 3, "max_replicas": 2}}, "below min_replicas"),
        ({"models": ["clip:tiny", "pickscore:tiny"],
          "ensembles": [{"name": "e", "members": ["clip:tiny", "pickscore:tiny"],
                         "kind": {"composition": "mean", "default": "uncertainty"}}]}, "per prompt group"),
        ({"models": ["nope"]}, "nope"),
        ({"ssl_certfile": __file__}, "go together"),
        ({"ssl_certfile": __file__, "ssl_keyfile": str(tmp_path / "key.pem")}, "ssl_keyfile: no file"),
    ]:
        with pytest.raises(ConfigError, match=named):
            validate(ServeConfig, {**base, **extra}, "serve.yaml")
    assert not ServeConfig(**base).token_required and ServeConfig(**base, host="0.0.0.0").token_required


ROOTS = ["s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http", "gs://other/imgs"]


@pytest.mark.parametrize(
    ("uri", "named"),
    [
        ("s3://bucket/prefix/a/x.png", None),
        ("s3://bucket/prefix/x.png?scheme=http&endpoint_override=127.0.0.1:9000", None),  # the root's options
        ("gs://other/imgs/x.png", None),
        ("s3://bucket/prefix/../secret/x.png", "the segment '..'"),
        ("s3://bucket/prefix/%2e%2e/secret/x.png", "the segment '..'"),
        ("s3://bucket/prefix/a%2F..%2F..%2Fx.png", "the segment '..'"),
        ("s3://bucket/prefix/%252e%252e/x.png", "percent-encoded twice"),
        ("s3://bucket/prefix/./x.png", "the segment '.'"),
        ("s3://bucket/prefix//x.png", "the segment ''"),
        ("s3://bucket/prefix-evil/x.png", "outside the image roots"),
        ("s3://bucket/prefix", "outside the image roots"),
        ("s3://bucket2/prefix/x.png", "outside the image roots"),
        ("gs://bucket/prefix/x.png", "outside the image roots"),
        ("s3://bucket/prefix/x.png?endpoint_override=169.254.169.254:80", "options (after '?') differ"),
        ("s3://key:secret@bucket/prefix/x.png", "credentials"),
        ("s3://bucket/prefix/x.png#frag", "fragment"),
        ("s3://bucket/prefix/x\\y.png", "backslash"),
        ("https://bucket/prefix/x.png", "URLs are never fetched"),
    ],
)
def test_image_uri_checked_against_the_uri_roots(uri, named):
    """The pure check of a client-named store URI (no Serve, no store): inside a root or a 403 saying why."""
    from tn_ray.serve.inputs import RequestError, uri_under_roots

    if named is None:
        root, rel = uri_under_roots(uri, ROOTS, "images[0]")
        assert root == ROOTS[uri.startswith("gs://")] and rel.endswith("x.png") and ".." not in rel
        return
    with pytest.raises(RequestError, match="^images\\[0\\]: ") as err:
        uri_under_roots(uri, ROOTS, "images[0]")
    assert err.value.status == 403 and named in str(err.value), str(err.value)


def test_uri_image_roots_in_the_config(tmp_path):
    from tn_ray.config import ConfigError, validate
    from tn_ray.serve.config import ServeConfig

    cfg = ServeConfig(models=["clip:tiny"], image_roots=[str(tmp_path), "s3://bucket/prefix/?region=us-east-1"])
    assert cfg.uri_roots == ["s3://bucket/prefix?region=us-east-1"] and cfg.local_roots == [str(tmp_path.resolve())]
    for root, named in [("file:///tmp", "give a local folder as a path"), ("s3://bucket/a/../b", "the segment '..'"),
                        ("s3:///prefix", "no scheme or no bucket")]:
        with pytest.raises(ConfigError, match=named):
            validate(ServeConfig, {"models": ["clip:tiny"], "image_roots": [root]}, "serve.yaml")


def test_the_shipped_config_loads_with_tiny_models_on_loopback():
    from pathlib import Path

    from tn_ray.config import load_config
    from tn_ray.serve.config import ServeConfig

    cfg = load_config(Path(__file__).resolve().parents[1] / "sweeps" / "serve_rewards.yaml", ServeConfig)
    assert cfg.host == "127.0.0.1" and not cfg.token_required
    assert all(m.endswith(":tiny") for m in cfg.models)


def test_reward_service_key_of_a_reward_config():
    """``reward: {service: URL}`` picks the HTTP backend; anything but an http(s) URL is refused."""
    from tn_ray.config import ConfigError, validate
    from tn_ray.scoring.service_pool import ServicePool, reward_pool
    from tn_ray.textnorm.columns import RewardConfig

    rc = RewardConfig(models=["clip:tiny"], use="clip:tiny", service="http://127.0.0.1:1")
    assert rc.service == "http://127.0.0.1:1"
    assert RewardConfig(models=["clip:tiny"], use="clip:tiny", service="serve:rewards").service == "serve:rewards"
    with pytest.raises(ConfigError, match="expected an http:// or https:// URL"):
        validate(RewardConfig, {"models": ["clip:tiny"], "use": "clip:tiny", "service": "/tmp/socket"}, "r.yaml")
    from tn_ray.client import ServiceError

    with pytest.raises(ServiceError, match="no answer"):  # the service is asked what it serves at once
        reward_pool("clip:tiny", service="http://127.0.0.1:1")
    assert ServicePool.__mro__[1].__name__ == "RewardPool"


def test_the_command_refuses_a_bad_config_in_one_line_before_ray_starts(capsys):
    from pathlib import Path

    from tn_ray.cli import main

    yaml = str(Path(__file__).resolve().parents[1] / "sweeps" / "serve_rewards.yaml")
    code = main(["serve", "rewards", yaml, "--set", "contrast_sources=[llm]"])
    err = capsys.readouterr().err
    assert code == 2 and "contrast_sources" in err and "never calls an outside API" in err
    code = main(["serve", "rewards", yaml, "--port", "0"])
    assert code == 2 and "port" in capsys.readouterr().err


def _deployments(app) -> dict[str, dict]:
    """Each deployment of a reward-service application (the front, then its models) as Serve's schema."""
    from ray.serve.deployment import deployment_to_schema

    front = app._bound_deployment
    models = [h._bound_deployment for h in front.init_args[2].values()]
    return {d.name: deployment_to_schema(d).model_dump(exclude_unset=True) for d in [front, *models]}


def test_write_deploy_writes_serve_config_of_the_same_application(tmp_path, capsys, monkeypatch):
    """``--write-deploy FILE``: Serve's config file, nothing started; its import_path is the builder, which
    builds from its args the deployments (names, replicas, autoscaling, actor options) the command runs."""
    import importlib
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from tn_ray.cli import main
    from tn_ray.config import load_config
    from tn_ray.serve.app import app_builder, build_app
    from tn_ray.serve.config import ServeConfig

    config = str(Path(__file__).resolve().parents[1] / "sweeps" / "serve_rewards.yaml")
    sets = ["replica.max_replicas=3", "replicas={pickscore:tiny: {num_cpus: 0.25}}", "require_token=true"]
    out = tmp_path / "deploy.yaml"
    argv = ["serve", "rewards", config, "--port", "8123", *[a for s in sets for a in ("--set", s)]]
    assert main([*argv, "--write-deploy", str(out)]) == 0
    assert "TN_RAY_SERVE_TOKEN" in capsys.readouterr().out
    doc = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(doc)
    assert doc["http_options"] == {"host": "127.0.0.1", "port": 8123}
    (app,) = doc["applications"]
    assert (app["name"], app["route_prefix"]) == ("tn_ray_rewards", "/") and "ray" not in app["args"]
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert builder is app_builder
    with pytest.raises(ValueError, match="set TN_RAY_SERVE_TOKEN where Serve builds"):
        monkeypatch.delenv("TN_RAY_SERVE_TOKEN", raising=False)
        builder(app["args"])
    monkeypatch.setenv("TN_RAY_SERVE_TOKEN", TOKEN)
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    built = call_user_app_builder_with_args_if_necessary(builder, app["args"])  # as `serve run/deploy` calls it
    cfg = load_config(config, ServeConfig, {"port": 8123, "replica.max_replicas": 3,
                                            "replicas": {"pickscore:tiny": {"num_cpus": 0.25}}, "require_token": True})
    want = _deployments(build_app(cfg, TOKEN))
    assert _deployments(built) == want and len(want) == 3
    assert want["reward0_clip_tiny"]["autoscaling_config"]["max_replicas"] == 3
    assert want["reward1_pickscore_tiny"]["ray_actor_options"]["num_cpus"] == 0.25
    front, command_front = built._bound_deployment, build_app(cfg, TOKEN)._bound_deployment
    assert front.init_args[1] == TOKEN
    assert {**front.init_args[0], "ray": None} == {**command_front.init_args[0], "ray": None}


def _self_signed(folder) -> tuple[str, str]:
    """(certificate, key) PEM files of a self-signed certificate for 127.0.0.1, valid for a day."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return str(folder / "cert.pem"), str(folder / "key.pem")


def test_tls_from_the_config_last_it_restarts_serve(service, local_workers, tmp_path):
    """``ssl_certfile`` / ``ssl_keyfile``: the service answers https:// only, the client verifies it
    against the given CA file, and values are unchanged. Last of the module: Serve restarts with TLS."""
    pytest.importorskip("cryptography")
    from ray import serve

    from tn_ray.client import RewardClient, ServiceError
    from tn_ray.serve.app import start
    from tn_ray.serve.config import ServeConfig

    cert, key = _self_signed(tmp_path)
    serve.shutdown()  # http options are fixed while Serve runs
    cfg = ServeConfig(port=free_port(), models=["clip:tiny"], replica={"num_cpus": 0.5}, require_token=True,
                      ssl_certfile=cert, ssl_keyfile=key)
    url = start(cfg, token=TOKEN)
    assert url.startswith("https://127.0.0.1:")
    images, prompts = request(9, n=3)
    out = RewardClient(url, TOKEN, cafile=cert).score(images, prompts, reward="textnorm(clip:tiny)", contrast=SETS)
    np.testing.assert_allclose(out["scores"], in_process(local_workers, images, prompts)["textnorm(clip:tiny)"],
                               rtol=1e-5)
    with pytest.raises(ServiceError, match="CERTIFICATE_VERIFY_FAILED"):
        RewardClient(url, TOKEN, retries=0).rewards()
    with pytest.raises(ServiceError, match="no answer"):
        RewardClient(url.replace("https://", "http://"), TOKEN, retries=0).rewards()
    with pytest.raises(ServiceError, match="401"):
        RewardClient(url, "wrong", cafile=cert).rewards()


def test_a_multi_reward_column_is_served_through_the_one_columns_function():
    """models_of and answer (no Serve): a multi-reward needs its columns' models (contrast for TextNorm
    ones) and its ensembles, and answers the hand combination."""
    from tn_ray.serve.config import ServeConfig
    from tn_ray.serve.inputs import ScoreJob, answer, models_of
    from tn_ray.textnorm.columns import SetParams, reward_columns

    cfg = ServeConfig(models=["clip:tiny", "pickscore:tiny"], ensembles=[
        {"name": "raw-mean", "members": ["clip:tiny", "pickscore:tiny"], "textnorm": False},
        {"name": "mix", "columns": {"textnorm(clip:tiny)": 0.7, "raw-mean": 0.3}}])
    assert "mix" in cfg.columns
    models = models_of(["mix"], cfg)
    assert models == {"clip:tiny": True, "pickscore:tiny": False}
    rows = {"clip:tiny": [np.array([1.0, 0.0, 2.0]), np.array([0.5, 0.5])], "pickscore:tiny": [np.array([3.0]),
                                                                                               np.array([-1.0])]}
    job = ScoreJob([np.zeros((2, 2, 3))] * 2, ["a", "b"], ["mix"], models, None, "inline")
    got = answer(job, rows, cfg, {"clip:tiny": "x", "pickscore:tiny": "y"})["columns"]["mix"]
    values = {"clip:tiny": np.array([[1.0, 0.0, 2.0], [0.5, 0.5, np.nan]]), "pickscore:tiny": np.array([[3.0], [-1.0]])}
    tn = reward_columns(values, SetParams())["textnorm(clip:tiny)"]
    np.testing.assert_allclose(got, 0.7 * tn + 0.3 * np.array([2.0, -0.25]))
