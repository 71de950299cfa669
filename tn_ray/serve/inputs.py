"""A reward request checked before any model sees it: the JSON body, the requested columns, the
contrastive sets and every image; each problem a :class:`RequestError` with its HTTP status and a
message naming the field and the value (docs/serve.md lists the rules).

Images come as base64 PNG / JPEG bytes, or as ``{"path": ...}`` naming a file under a configured
local image root or an object under a configured store URI root (``s3://bucket/prefix``, read through
:class:`tn_ray.storage.Store`): nothing else is read (no other file, no URL). Each image is decoded
here, once, into an RGB array that the model replicas score as is (the same pixels ``load_image``
gives in-process).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from tn_ray.data.sets import validate_sets
from tn_ray.errors import InputError
from tn_ray.prompts.contrast import sets_for, texts_for
from tn_ray.rewards import parse
from tn_ray.scoring.matrix import pad_rows
from tn_ray.serve.config import LimitsConfig, ServeConfig, split_store_uri
from tn_ray.storage import Store
from tn_ray.textnorm.columns import column_models, reward_columns, specs_for


class RequestError(InputError):
    """A bad request: ``status`` is its HTTP status (400 bad value, 401 no token, 403 refused path,
    413 over a limit); the message names the field and the value."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class ScoreJob:
    """One checked request: RGB arrays, prompts, the columns asked for and what each model scores."""

    images: list[np.ndarray]
    prompts: list[str]
    columns: list[str]  # canonical column names, as asked
    models: dict[str, bool]  # model spec -> whether its texts carry the contrastive prompts
    texts: list[list[str]] | None  # [x0, x1..xm] per image when some model needs contrast
    contrast: str | None  # 'inline', a source name, or None


def parse_json(body: bytes, limits: LimitsConfig) -> dict[str, Any]:
    if len(body) > limits.max_request_bytes:
        raise RequestError(f"request body of {len(body)} bytes is over the limit of {limits.max_request_bytes} bytes",
                           413)
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(f"request body is not JSON ({err})") from None
    if not isinstance(data, dict):
        raise RequestError(f"request body must be a JSON object, got {type(data).__name__}")
    return data


def canonical_column(name: Any, cfg: ServeConfig) -> str:
    """A requested column in canonical spelling (``textnorm(clip:tiny)``); unknown -> 400 naming it."""

    if not isinstance(name, str) or not name:
        raise RequestError(f"reward: expected a column name or a list of them, got {json.dumps(name)[:80]}")
    inner = name[len("textnorm(") : -1] if name.startswith("textnorm(") and name.endswith(")") else name
    if name not in cfg.columns:
        try:
            canon = str(parse(inner))
        except (KeyError, ValueError):
            canon = None
        if canon is not None:
            name = f"textnorm({canon})" if inner != name else canon
    if name not in cfg.columns:
        raise RequestError(f"unknown reward {name!r}; this service answers {cfg.columns}")
    return name


def models_of(columns: Sequence[str], cfg: ServeConfig) -> dict[str, bool]:
    """Model -> whether it must score the contrastive prompts too, for the requested ``columns``."""

    out: dict[str, bool] = {}
    for col in columns:
        for m, contrast in column_models(col, cfg.models, cfg.ensembles).items():
            out[m] = out.get(m, False) or contrast
    return out


def check_prompt(p: Any, where: str, limits: LimitsConfig) -> str:
    if not isinstance(p, str) or not p.strip():
        raise RequestError(f"{where}: expected a non-empty prompt string, got {json.dumps(p)[:80]}")
    if len(p) > limits.max_prompt_chars:
        raise RequestError(f"{where}: a prompt of {len(p)} characters is over the limit of {limits.max_prompt_chars}",
                           413)
    return p


def image_bytes(item: Any, where: str, cfg: ServeConfig) -> bytes:
    """The encoded bytes of one request image: base64 text (a ``data:`` URL prefix allowed) or a
    ``{"path": ...}`` inside an image root; anything else is refused before it is read."""
    limits = cfg.limits
    if isinstance(item, Mapping) and set(item) == {"path"}:
        return _read_path(item["path"], where, cfg)
    if isinstance(item, Mapping) and set(item) == {"b64"}:
        item = item["b64"]
    if not isinstance(item, str):
        raise RequestError(f"{where}: expected base64 PNG/JPEG text or {{\"path\": ...}}, got "
                           f"{type(item).__name__}")
    if item.startswith("data:"):
        item = item.partition(",")[2]
    if len(item) > limits.max_image_bytes * 4 // 3 + 4:
        raise RequestError(f"{where}: image too large ({len(item) * 3 // 4} bytes; the limit is "
                           f"{limits.max_image_bytes} bytes)", 413)
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: not an image (not valid base64)") from None


def _read_path(path: Any, where: str, cfg: ServeConfig) -> bytes:
    if not cfg.image_roots:
        raise RequestError(f"{where}: image paths are not served here (the service has no image_roots); send the "
                           "image bytes as base64", 403)
    if isinstance(path, str) and "://" in path:
        return _read_uri(path, where, cfg)
    if not isinstance(path, str) or not path or "\x00" in path:
        raise RequestError(f"{where}: {json.dumps(path)[:80]} is not a file path", 403)
    resolved = Path(path).expanduser().resolve()
    if not any(resolved.is_relative_to(root) for root in cfg.local_roots):
        raise RequestError(f"{where}: path {path!r} is outside the image roots this service reads", 403)
    if not resolved.is_file():
        raise RequestError(f"{where}: no image file at {path!r}")
    size = resolved.stat().st_size
    if size > cfg.limits.max_image_bytes:
        raise RequestError(f"{where}: image too large ({size} bytes; the limit is {cfg.limits.max_image_bytes} bytes)",
                           413)
    return resolved.read_bytes()


def uri_under_roots(uri: str, roots: Sequence[str], where: str) -> tuple[str, str]:
    """(root, path relative to it) of a store URI a client named, when it lies inside one of the URI
    image ``roots`` (:meth:`StoreUri.inside`) with that root's options or none; else a 403
    :class:`RequestError` naming the URI and why."""
    try:
        asked = split_store_uri(uri)
    except ValueError as err:
        raise RequestError(f"{where}: {uri[:200]!r} is refused: {err}", 403) from None
    if asked.credentials:
        raise RequestError(f"{where}: {uri[:200]!r} is refused: credentials in an image URI", 403)
    if asked.scheme in ("http", "https", "ftp"):
        raise RequestError(f"{where}: {uri[:200]!r} is a URL; URLs are never fetched", 403)
    for root in roots:
        base = split_store_uri(root)
        if asked.inside(base):
            if asked.options not in ((), base.options):
                raise RequestError(f"{where}: {uri[:200]!r} is refused: its options (after '?') differ from its "
                                   "image root's (the service reads with the root's)", 403)
            return root, "/".join(asked.parts[len(base.parts):])
    raise RequestError(f"{where}: URI {uri[:200]!r} is outside the image roots this service reads", 403)


@lru_cache(maxsize=32)
def _root_store(root: str):
    return Store(root)


def _read_uri(uri: str, where: str, cfg: ServeConfig) -> bytes:
    """The bytes of an object under a URI image root, read through the root's :class:`Store` (its
    filesystem and options, never the request's)."""
    from pyarrow import ArrowException
    from pyarrow.fs import FileType

    root, rel = uri_under_roots(uri, cfg.uri_roots, where)
    store = _root_store(root)
    try:
        info = store.fs.get_file_info(store.path(rel))
        if info.type != FileType.File:
            raise RequestError(f"{where}: no image object at {uri!r}")
        if info.size is not None and info.size > cfg.limits.max_image_bytes:
            raise RequestError(f"{where}: image too large ({info.size} bytes; the limit is "
                               f"{cfg.limits.max_image_bytes} bytes)", 413)
        return store.read_bytes(rel)
    except (OSError, ArrowException) as err:
        raise RequestError(f"{where}: cannot read {uri!r} ({str(err).splitlines()[0][:200]})", 502) from None


def decode_image(data: bytes, where: str, limits: LimitsConfig) -> np.ndarray:
    """An RGB uint8 array of PNG / JPEG ``data``; 400 when it is not one, 413 when over a limit."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_image_bytes:
        raise RequestError(f"{where}: image too large ({len(data)} bytes; the limit is {limits.max_image_bytes} "
                           "bytes)", 413)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in ("PNG", "JPEG"):
                raise RequestError(f"{where}: a {im.format} image; only PNG or JPEG are read")
            w, h = im.size
            if w * h > limits.max_image_pixels:
                raise RequestError(f"{where}: image too large ({w} x {h} pixels; the limit is "
                                   f"{limits.max_image_pixels} pixels)", 413)
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise RequestError(f"{where}: not an image (not a readable PNG or JPEG: {err})") from None


def pairs_of(data: Mapping[str, Any], limits: LimitsConfig) -> tuple[list[Any], list[Any], str]:
    """(image items, prompt items, field name) of ``pairs`` or ``images`` + ``prompts``."""
    if "pairs" in data:
        if "images" in data or "prompts" in data:
            raise RequestError("give either pairs or images + prompts, not both")
        pairs = data["pairs"]
        if not isinstance(pairs, list) or not all(isinstance(p, Mapping) and set(p) == {"image", "prompt"}
                                                  for p in pairs):
            raise RequestError("pairs: expected a list of {\"image\": ..., \"prompt\": ...} objects")
        images, prompts, field = [p["image"] for p in pairs], [p["prompt"] for p in pairs], "pairs[{i}]"
    elif "images" in data and "prompts" in data:
        images, prompts = data["images"], data["prompts"]
        if not isinstance(images, list) or not isinstance(prompts, list):
            raise RequestError("images and prompts must be lists")
        if len(images) != len(prompts):
            raise RequestError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per image")
        field = "images[{i}]"
    else:
        raise RequestError("no pairs: give pairs [{image, prompt}] or images + prompts")
    if not images:
        raise RequestError("no pairs: the request holds no image")
    if len(images) > limits.max_pairs:
        raise RequestError(f"too many pairs: {len(images)}; the limit is {limits.max_pairs} per request", 413)
    return images, prompts, field


def contrast_sets(given: Any, prompts: Sequence[str], cfg: ServeConfig) -> tuple[dict[str, list[str]], str]:
    """The contrastive sets of ``given``: inline ``{x0: [x1..xm]}`` or a source name the config allows."""

    if given is None:
        raise RequestError("contrast: this reward needs contrastive sets: give them inline {prompt: [contrastive "
                           f"prompts]}} or name a source among {cfg.contrast_sources}")
    if isinstance(given, str):
        if given == "llm":
            raise RequestError("contrast: 'llm' is not served (the service never calls an outside API on a client's "
                               "behalf); send the sets inline")
        if given not in cfg.contrast_sources:
            raise RequestError(f"contrast: unknown source {given!r}; this service serves {cfg.contrast_sources} or "
                               "inline sets")
        try:
            return sets_for(given, prompts), given
        except InputError as err:
            raise RequestError(f"contrast {given!r}: {err}") from None
    try:
        sets = validate_sets(given, "contrast")
    except InputError as err:
        raise RequestError(str(err)) from None
    for x0, xs in sets.items():
        if len(xs) > cfg.limits.max_contrast:
            raise RequestError(f"contrast: the set of {x0!r} holds {len(xs)} prompts; the limit is "
                               f"{cfg.limits.max_contrast}", 413)
        for x in xs:
            check_prompt(x, f"contrast[{x0!r}]", cfg.limits)
    return sets, "inline"


def parse_request(body: bytes, cfg: ServeConfig) -> ScoreJob:
    """A checked :class:`ScoreJob` from the raw body of ``POST /v1/score``."""

    data = parse_json(body, cfg.limits)
    unknown = sorted(set(data) - {"pairs", "images", "prompts", "reward", "contrast"})
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; expected pairs or images + prompts, reward, contrast")
    if "reward" not in data:
        raise RequestError(f"reward: missing; name one or more of {cfg.columns}")
    asked = data["reward"] if isinstance(data["reward"], list) else [data["reward"]]
    if not asked:
        raise RequestError(f"reward: an empty list; name one or more of {cfg.columns}")
    columns = list(dict.fromkeys(canonical_column(c, cfg) for c in asked))
    items, prompt_items, field = pairs_of(data, cfg.limits)
    prompts = [check_prompt(p, field.format(i=i) + ".prompt" if "pairs" in field else f"prompts[{i}]", cfg.limits)
               for i, p in enumerate(prompt_items)]
    models = models_of(columns, cfg)
    texts, origin = None, None
    if any(models.values()):
        sets, origin = contrast_sets(data.get("contrast"), prompts, cfg)
        try:
            texts = texts_for(prompts, sets, f"contrast ({origin})")
        except InputError as err:
            raise RequestError(str(err)) from None
    images = [decode_image(image_bytes(it, field.format(i=i), cfg), field.format(i=i), cfg.limits)
              for i, it in enumerate(items)]
    return ScoreJob(images, prompts, columns, models, texts, origin)


def job_values(job: ScoreJob, rows: Mapping[str, Sequence[np.ndarray]]) -> dict[str, np.ndarray]:
    """Each model's score-matrix values (images, 1 + m) from its score rows (column 0 = x0)."""

    return {m: pad_rows(rows[m]) for m in job.models}


def answer(job: ScoreJob, rows: Mapping[str, Sequence[np.ndarray]], cfg: ServeConfig,
           revisions: Mapping[str, str]) -> dict[str, Any]:
    """The JSON answer: every requested column (through the one reward-columns function), the first
    as ``scores``, and the revision of every model that scored."""

    values = job_values(job, rows)
    ensembles = specs_for(job.columns, cfg.ensembles)
    cols = reward_columns(values, cfg.textnorm, ensembles)
    out = {c: [float(x) if np.isfinite(x) else None for x in cols[c]] for c in job.columns}
    return {
        "n": len(job.prompts),
        "reward": job.columns[0],
        "scores": out[job.columns[0]],
        "columns": out,
        "revisions": {m: revisions[m] for m in job.models},
        "contrast": job.contrast,
    }
