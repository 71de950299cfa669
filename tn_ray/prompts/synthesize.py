"""``tn-ray prompts synthesize``: contrastive sets for a file of prompts, sharded on Ray Data.

Prompts are split into batches that ``map_batches`` sends to a bounded pool of
:class:`SynthesisWorker` actors (``ActorPoolStrategy(size=workers)``): each actor holds one
source and handles one batch at a time, so at most ``workers`` API requests are in flight
(and ``llm.requests_per_minute`` is split between them). Output: one JSON file in the
released sets' format ``{x0: [x1, ..]}`` (input order, x0s without a set left out) and a
report (counts per source, fallbacks, failures, the source of every set). LLM answers are
cached as they arrive, so a crashed or repeated run only asks for what is missing.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import Field, SecretStr, field_validator

from tn_ray.config import RayConfig, StrictModel
from tn_ray.errors import InputError
from tn_ray.prompts import SOURCES, build
from tn_ray.prompts.base import ContrastSet
from tn_ray.prompts.cache import AnswerCache
from tn_ray.prompts.llm import LlmError, LlmSource, api_key_from_env, instruction_version, public_url, resolve_base_url
from tn_ray.prompts.settings import SourcesConfig
from tn_ray.storage import check_output_file, read_json

log = logging.getLogger(__name__)


class SynthesisConfig(StrictModel):
    input: str = Field(..., description="prompts: a text file (one per line), a JSON list, a JSON object {x0: ...} or "
                                        "a TIA2 label file")
    out: str = Field(..., description="JSON file written in the released sets' format {x0: [x1..xm]}")
    report: str | None = Field(None, description="report JSON (counts per source, failures); None = <out>.report.json")
    source: str = Field("rules", description="source of the sets: released | rules | llm (or a registered name)")
    workers: int = Field(
        2, ge=1, description="concurrent Ray actors; with llm, the most API requests in flight (count)"
    )
    batch_size: int = Field(8, ge=1, description="prompts per map_batches batch (prompts)")
    cpus_per_worker: float = Field(
        0.25, gt=0, description="CPUs reserved per actor; API calls wait on the network (count)"
    )
    sources: SourcesConfig = Field(
        default_factory=SourcesConfig, description="settings of the rules, llm and released sources"
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="where Ray runs")

    @field_validator("source")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in SOURCES:
            raise ValueError(f"unknown source '{v}'; known: {sorted(SOURCES)}")
        return v

    def report_path(self) -> Path:
        out = Path(self.out)
        return Path(self.report) if self.report else out.with_name(out.stem + ".report.json")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Unique prompts of ``path`` in file order (see ``SynthesisConfig.input``); errors name the file."""

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file not found: {path}" if not path.exists() else f"prompt file {path} is not a file"
        )
    if path.suffix.lower() == ".json":
        data = read_json(path, "prompt file")
        if isinstance(data, dict):
            records = list(data.values())
            if records and all(isinstance(r, dict) and "caption" in r for r in records):
                data = [r["caption"] for r in records]  # a TIA2 label file: its prompts
            else:
                data = list(data)
        if not isinstance(data, list):
            raise InputError(
                f"{path}: expected a JSON list of prompts or an object {{prompt: ...}}, got {type(data).__name__}"
            )
        bad = [(i, type(x).__name__) for i, x in enumerate(data) if not isinstance(x, str)]
        if bad:
            raise InputError(
                f"{path}: item {bad[0][0]} is a {bad[0][1]}, expected a prompt string ({len(bad)} such items)"
            )
        prompts = [" ".join(x.split()) for x in data]
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
        prompts = [" ".join(line.split()) for line in text.splitlines()]
    prompts = list(dict.fromkeys(p for p in prompts if p))
    if not prompts:
        raise InputError(f"{path}: no prompts found")
    return prompts


class SynthesisWorker:
    """One source in one Ray actor: a pandas batch (index, x0) -> one row per x0."""

    def __init__(
        self,
        source: str,
        sources: dict,
        api_key: SecretStr | None = None,
        base_url: str | None = None,
        workers: int = 1,
    ):
        cfg = SourcesConfig.model_validate(sources)
        extra: dict[str, Any] = (
            {"api_key": api_key, "base_url": base_url, "workers": workers} if source == "llm" else {}
        )
        self.source = build(source, cfg, **extra)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        sets, fatal = [], ""
        for x0 in (str(x) for x in batch["x0"]):
            if not fatal:
                try:
                    sets.append(self.source.generate([x0])[0])
                    continue
                except LlmError as err:  # reported as data: Ray would flatten the exception to text
                    fatal = str(err)
            sets.append(ContrastSet(x0, [], self.source.name, error=fatal))
        return pd.DataFrame(
            {
                "index": batch["index"].to_numpy(),
                "x0": [s.x0 for s in sets],
                "prompts": [
                    json.dumps(s.prompts, ensure_ascii=False) for s in sets
                ],  # JSON: one Arrow type for all batches
                "source": [s.source for s in sets],
                "error": [s.error or "" for s in sets],
                "note": [s.note or "" for s in sets],
                "api_calls": [s.api_calls for s in sets],
                "cached": [s.cached for s in sets],
                "fatal": fatal,
            }
        )


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _run_ray(cfg: SynthesisConfig, x0s: list[str], kwargs: dict) -> pd.DataFrame:
    import ray
    from ray.data import ActorPoolStrategy
    from tqdm.auto import tqdm

    from tn_ray.cluster import init_ray

    init_ray(cfg.ray)
    workers = min(cfg.workers, -(-len(x0s) // cfg.batch_size))
    kwargs = {**kwargs, "workers": workers}
    ds = ray.data.from_items([{"index": i, "x0": x} for i, x in enumerate(x0s)])
    ds = ds.map_batches(
        SynthesisWorker,
        fn_constructor_kwargs=kwargs,
        batch_size=cfg.batch_size,
        batch_format="pandas",
        compute=ActorPoolStrategy(size=workers),
        num_cpus=cfg.cpus_per_worker,
    )
    parts = []
    with tqdm(total=len(x0s), desc=f"prompts ({cfg.source})", unit="prompt") as bar:
        for part in ds.iter_batches(batch_format="pandas", batch_size=None):
            fatal = part.loc[part["fatal"] != "", "fatal"]
            if len(fatal):  # a refused key or unknown model: stop, keeping the answers cached so far
                raise LlmError(f"{fatal.iloc[0]} (answers received so far are cached)")
            parts.append(part.drop(columns=["fatal"]))
            bar.update(len(part))
    return pd.concat(parts, ignore_index=True).sort_values("index", ignore_index=True)


def synthesize(cfg: SynthesisConfig) -> dict[str, Path]:
    """Write the sets and the report of ``cfg.input``; returns {"sets": path, "report": path}."""

    start = time.time()
    x0s = read_prompts(cfg.input)
    check_output_file(cfg.out)  # both outputs can be written: checked before Ray starts
    check_output_file(cfg.report_path())
    kwargs: dict[str, Any] = {"source": cfg.source, "sources": cfg.sources.model_dump(mode="json")}
    extra: dict[str, Any] = {}
    if cfg.source == "llm":

        llm = cfg.sources.llm
        probe = LlmSource(llm, base_url=resolve_base_url(llm))
        missing = probe.missing(x0s)
        # the key is needed only when some answer is not cached yet
        kwargs["api_key"] = api_key_from_env(llm) if missing else None
        kwargs["base_url"] = probe.base_url
        extra = {
            "model": llm.model,
            "base_url": public_url(probe.base_url),
            "instruction_version": instruction_version(llm),
            "preset": llm.preset,
            "cache": str(AnswerCache(llm.cache_dir).path),
            "uncached_before_run": len(missing),
        }
        log.info("llm %s: %d of %d prompts need the API", llm.model, len(missing), len(x0s))
    elif cfg.source == "released":
        build("released", cfg.sources)  # a missing TIA2 copy fails here, before Ray starts
    rows = _run_ray(cfg, x0s, kwargs)

    sets = {r.x0: json.loads(r.prompts) for r in rows.itertuples() if not r.error}
    out, report_path = Path(cfg.out), cfg.report_path()
    _atomic_write(out, json.dumps(sets, indent=2, ensure_ascii=False) + "\n")
    ok = rows[rows["error"] == ""]
    report = {
        "input": str(cfg.input),
        "out": str(out),
        "source": cfg.source,
        "prompts": len(rows),
        "sets_written": len(sets),
        "counts_by_source": {k: int(v) for k, v in ok["source"].value_counts().sort_index().items()},
        "fallbacks": [{"x0": r.x0, "source": r.source, "reason": r.note} for r in ok.itertuples() if r.note],
        "failures": [{"x0": r.x0, "error": r.error} for r in rows.itertuples() if r.error],
        "api_calls": int(rows["api_calls"].sum()),
        "cached": int(rows["cached"].sum()),
        **extra,
        "set_sizes": {
            "min": int(ok["prompts"].map(lambda p: len(json.loads(p))).min()) if len(ok) else 0,
            "max": int(ok["prompts"].map(lambda p: len(json.loads(p))).max()) if len(ok) else 0,
        },
        "sources": {r.x0: r.source for r in ok.itertuples()},
        "seconds": round(time.time() - start, 1),
        "config": cfg.model_dump(mode="json"),
    }
    _atomic_write(report_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return {"sets": out, "report": report_path}
