"""A Python client of the reward service (``tn-ray serve rewards``; docs/serve.md): JSON over HTTP
with the standard library only, images sent as base64 PNG / JPEG, no pickle on the wire.

    client = RewardClient("http://127.0.0.1:8000", token=None)
    out = client.score(images, prompts, reward="textnorm(clip:tiny)", contrast="rules")
    out["scores"], out["columns"], out["revisions"]

:meth:`RewardClient.reward_fn` is the ``reward_fn(images, prompts, metadata) -> (scores, info)``
shape external trainers call (flow_grpo / ddpo-pytorch style).
"""
from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tn_ray.errors import TnRayError

TOKEN_ENV = "TN_RAY_SERVE_TOKEN"  # the service's token: read by the service and by its clients


class ServiceError(TnRayError, RuntimeError):
    """The service refused a request (4xx: the message names the problem) or failed (5xx), or cannot
    be reached; ``status`` is the HTTP status (0 when no answer came)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


def encode_image(image: Any) -> str:
    """Base64 text of one image: PNG/JPEG bytes as they are, a local file's bytes, a PIL image, an
    array or a torch tensor (:func:`as_uint8_hwc`) as lossless PNG (the service decodes the same pixels)."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:  # the caller's own file, read here; the service never sees the path
            data = f.read()
    else:
        from PIL import Image

        im = image if isinstance(image, Image.Image) else Image.fromarray(as_uint8_hwc(image))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        data = buf.getvalue()
    return base64.b64encode(data).decode("ascii")


def image_item(image: Any) -> str | dict[str, str]:
    """One image as a request carries it: a store URI (``s3://bucket/key``, ``gs://...``) as
    ``{"path": uri}``, which the service reads only under its configured image roots; anything else
    as base64 text (:func:`encode_image`)."""
    if isinstance(image, str) and "://" in image:  # tn_ray.storage's test of a URI (not imported: stdlib only)
        return {"path": image}
    return encode_image(image)


def as_uint8_hwc(image: Any):
    """An HWC uint8 array of an array or torch tensor: CHW is transposed, floats are taken as [0, 1]
    (as trainers hand decoded images) and rounded to 8 bits."""
    import numpy as np

    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().float().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr


class RewardClient:
    """The reward service at ``url`` (its base, e.g. ``http://127.0.0.1:8000``); ``token`` when the
    service requires one (sent as ``Authorization: Bearer``; default: ``TN_RAY_SERVE_TOKEN`` if set).
    A request that gets no answer or a 5xx is retried ``retries`` times (scoring is pure: a retry
    cannot change a value); a 4xx never is."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 300.0, retries: int = 2,
                 cafile: str | None = None):
        self.url = url.rstrip("/")
        self.cafile = cafile  # a CA bundle (PEM) to verify an https:// service against; None = the system's
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.timeout_s = timeout_s
        self.retries = retries
        self.retried = 0  # requests sent again after no answer or a 5xx (a counter for tests and logs)

    def _request(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.retried += 1
                time.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))  # a replica that died is being replaced
            req = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s, context=self._tls()) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as err:
                text = err.read().decode(errors="replace")
                try:
                    message = json.loads(text).get("error", text)
                except (json.JSONDecodeError, AttributeError):
                    message = text
                if err.code < 500 or err.code == 501:  # the request's fault: never retried
                    raise ServiceError(f"{self.url}{path}: {err.code}: {message}", err.code) from None
                last = ServiceError(f"{self.url}{path}: {err.code}: {message}", err.code)
            except (urllib.error.URLError, ConnectionError, TimeoutError) as err:  # retried: scoring is pure
                last = ServiceError(f"{self.url}{path}: no answer ({getattr(err, 'reason', err)})")
        raise last  # type: ignore[misc]

    def _tls(self):
        if not self.url.startswith("https://"):
            return None
        import ssl

        return ssl.create_default_context(cafile=self.cafile)

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/v1/health")

    def rewards(self) -> dict[str, Any]:
        """The columns, models, model revisions, contrastive-set sources and limits the service has."""
        return self._request("GET", "/v1/rewards")

    def stats(self) -> dict[str, Any]:
        return self._request("GET", "/v1/stats")

    def score(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        reward: str | Sequence[str],
        contrast: str | Mapping[str, Sequence[str]] | None = None,
    ) -> dict[str, Any]:
        """Rewards of (image, prompt) pairs: ``{"scores": [...] (the first column), "columns": {name:
        [...]}, "revisions": {model: revision}, ...}``. ``reward``: a column (``clip:tiny``,
        ``textnorm(clip:tiny)``, an ensemble's name) or a list of them; ``contrast``: inline sets
        ``{prompt: [contrastive prompts]}`` or a source name the service allows (``rules``,
        ``released``), needed by TextNorm columns."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        payload: dict[str, Any] = {
            "images": [image_item(im) for im in images],
            "prompts": list(prompts),
            "reward": reward if isinstance(reward, str) else list(reward),
        }
        if contrast is not None:
            payload["contrast"] = contrast if isinstance(contrast, str) else {k: list(v) for k, v in contrast.items()}
        return self._request("POST", "/v1/score", payload)

    def score_rows(self, model: str, images: Sequence[Any], texts_per_image: Sequence[Sequence[str]]) -> list[list]:
        """One model's raw rewards of each image against its own texts (a row per image)."""
        payload = {"model": model, "images": [image_item(im) for im in images],
                   "texts": [list(t) for t in texts_per_image]}
        return self._request("POST", "/v1/score_rows", payload)["rows"]

    def reward_fn(
        self, reward: str, contrast: str | Mapping[str, Sequence[str]] | None = None
    ) -> Callable[[Sequence[Any], Sequence[str], Any], tuple[list[float], dict[str, Any]]]:
        """``reward_fn(images, prompts, metadata) -> (scores, info)``, the shape flow_grpo /
        ddpo-pytorch call; ``info`` holds every column and the model revisions."""

        def reward_fn(images: Sequence[Any], prompts: Sequence[str], metadata: Any = None):
            out = self.score(images, prompts, reward=reward, contrast=contrast)
            return out["scores"], {"columns": out["columns"], "revisions": out["revisions"], "reward": out["reward"]}

        return reward_fn
