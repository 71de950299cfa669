"""Seeded, sharded, streaming, resumable text-to-image generation on Ray Data.

Rows ``(prompt_id, prompt, sample, seed)`` go through ``map_batches`` with an actor pool of
:class:`GenerationWorker` (one diffusers pipeline per GPU; CPU actors without GPUs). Each
actor writes its images to the output store as it makes them and returns manifest rows,
which the driver appends as Parquet parts, one per finished batch. Nothing holds the images
in memory beyond the batch being made.

Layout of ``out`` (a local folder or a cloud URI, see :mod:`tn_ray.storage`)::

    generation.json                    the parameters that fix an image (a rerun must match)
    prompts.json                       prompt_id -> prompt
    images/<prompt_id>/<sample>.png    one file per (prompt, sample), written atomically
    manifest/part-*.parquet            prompt_id, prompt, sample, seed, image_id, path, sha256, bytes

Determinism. The seed of an image is a hash of (base seed, prompt text, sample index), and
its initial noise (and any scheduler noise) comes from its own ``torch.Generator``. The
diffusers call itself always covers the same fixed *group* of samples of one prompt
(samples ``[g*B, (g+1)*B)``, ``B = pipeline_batch_size``), whichever Ray batch, actor or
resumed run a sample is computed in, so floating-point kernels see identical inputs and
an image is bit-identical whatever ``batch_size``, the number of actors or the resume
point. (``B`` itself is part of the fingerprint: batched GPU/CPU kernels round differently
for different batch shapes.)

Resume. A rerun with the same parameters skips every (prompt, sample) in the manifest whose
file still has the recorded size and sha256 (a damaged or missing one is named in the log and
made again), adopts complete image files a killed driver wrote but never recorded (a file
exists only once fully written; one that does not decode is made again), deletes stale
temporaries, and generates only the rest.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Literal

import pandas as pd
import pyarrow as pa
from pydantic import Field

from tn_ray import testing
from tn_ray.config import RayConfig, StrictModel
from tn_ray.diffusion.pipelines import DEFAULT_PIPELINE, DTYPES, check_scheduler, check_source
from tn_ray.diffusion.seeds import seed_of
from tn_ray.errors import InputError, TnRayError
from tn_ray.scoring.images import image_problem
from tn_ray.storage import PartTable, Store, read_json

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema([
    ("prompt_id", pa.int64()), ("prompt", pa.string()), ("sample", pa.int64()), ("seed", pa.int64()),
    ("image_id", pa.string()), ("path", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64()),
])
# parameters that fix an image's pixels: a rerun into the same folder must not change them
FINGERPRINT_FIELDS = ("pipeline", "scheduler", "num_inference_steps", "guidance_scale", "height", "width",
                      "negative_prompt", "dtype", "seed", "pipeline_batch_size")
_IMAGE_RE = re.compile(r"^images/(\d+)/(\d+)\.png$")




def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:  # outside Ray
        return "local"


class GenerationMismatch(TnRayError, ValueError):
    """A rerun into an existing output folder changed a parameter that fixes its images."""


class GenerationConfig(StrictModel):
    out: str | None = Field(None, description="output folder or cloud URI (s3://, gs://, file://) for images and "
                                              "manifest; None = <run>/generation")
    pipeline: str = Field(DEFAULT_PIPELINE, description="diffusers text-to-image pipeline: hub id, local folder, or "
                                                        "'tiny' (random small config)")
    revision: str | None = Field(None, description="hub revision of `pipeline` (commit hash, branch or tag) passed to "
                                                   "from_pretrained; None = the default branch; the resolved commit is "
                                                   "recorded in provenance.json")
    scheduler: str | None = Field(None, description="diffusers scheduler class name (e.g. DDIMScheduler); None = the "
                                                    "pipeline's own")
    num_inference_steps: int = Field(50, ge=1, description="denoising steps per image (count)")
    guidance_scale: float = Field(7.5, ge=0, description="classifier-free guidance scale (unitless; <= 1 disables "
                                                         "guidance)")
    height: int | None = Field(None, ge=8, multiple_of=8, description="image height (pixels); None = the pipeline's "
                                                                      "default")
    width: int | None = Field(None, ge=8, multiple_of=8, description="image width (pixels); None = the pipeline's "
                                                                     "default")
    negative_prompt: str | None = Field(None, description="negative prompt for every image; None = none")
    dtype: Literal[DTYPES] = Field("auto", description="weights/activations dtype: auto = float16 on GPU (as in the "
                                                       "paper), float32 on CPU")
    seed: int = Field(0, ge=0, description="base seed; an image's seed is a hash of (seed, prompt, sample index)")
    samples_per_prompt: int = Field(256, ge=1, description="images per prompt: samples 0..n-1 (count)")
    pipeline_batch_size: int = Field(8, ge=1, description="images per diffusers call: a fixed group of consecutive "
                                                          "samples of one prompt (images)")
    batch_size: int = Field(32, ge=1, description="images per Ray task and per manifest part, rounded to whole "
                                                  "pipeline groups (images)")
    num_actors: int | None = Field(None, ge=1, description="generation actors (count); None = one per GPU, or one per "
                                                           "cpus_per_actor CPUs without GPUs")
    gpus_per_actor: float = Field(1.0, gt=0, le=1, description="GPU share per generation actor when GPUs exist "
                                                               "(fraction of one GPU)")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per generation actor (count)")
    error_retries: int = Field(2, ge=0, description="times a batch that raised an error is retried in its actor before "
                                                    "the run fails (a dead actor's batches are always retried: "
                                                    "preemptions never exhaust a budget)")

    def fingerprint(self) -> dict:
        return {k: getattr(self, k) for k in FINGERPRINT_FIELDS}


def image_path(prompt_id: int, sample: int) -> str:
    return f"images/{prompt_id:05d}/{sample:05d}.png"


def image_id(prompt_id: int, sample: int) -> str:
    return f"{prompt_id:05d}-{sample:05d}"


def group_samples(sample: int, group_size: int) -> range:
    """The fixed group of samples computed in one diffusers call with ``sample``."""
    start = (sample // group_size) * group_size
    return range(start, start + group_size)


def encode_png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def generate_group(pipe, cfg: GenerationConfig, prompt: str, samples: Sequence[int]) -> list:
    """PIL images of ``samples`` of ``prompt``: one diffusers call, one CPU generator per row."""
    import torch

    generators = [torch.Generator("cpu").manual_seed(seed_of(cfg.seed, prompt, s)) for s in samples]
    n = len(samples)
    kwargs = dict(num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                  height=cfg.height, width=cfg.width, generator=generators, output_type="pil")
    if cfg.negative_prompt is not None:
        kwargs["negative_prompt"] = [cfg.negative_prompt] * n
    with torch.inference_mode():
        return pipe(prompt=[prompt] * n, **kwargs).images


class GenerationWorker:
    """One text-to-image pipeline in one process (Ray Data callable class).

    A batch (pandas: prompt_id, prompt, sample, seed) -> its images written to the store,
    and one manifest row per image returned.
    """

    def __init__(self, cfg: dict, out: str, device: str | None = None, roll: str | None = None):
        from tn_ray.diffusion.pipelines import load_pipeline

        answer_roll(roll, f"{_node_id()}:{os.getpid()}")  # first: an actor that never gets a batch is waited for too
        self.cfg = GenerationConfig.model_validate(cfg)
        self.store = Store(out)
        self.pipe = load_pipeline(self.cfg.pipeline, self.cfg.scheduler, self.cfg.dtype, device, self.cfg.revision)
        self.images_made = 0

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        """Make one work unit; an error (say a transient CUDA fault) is retried here up to
        ``error_retries`` times, so a deterministic bug still fails the run. A dead actor
        (crash, preempted or lost node) is Ray Data's to handle: it restarts the actor and
        retries the unit without limit (its defaults), so spot preemptions never exhaust a
        restart budget."""
        for attempt in range(self.cfg.error_retries + 1):
            try:
                return self._make(batch)
            except Exception:
                if attempt == self.cfg.error_retries:
                    raise
                log.warning("generation batch failed (attempt %d of %d); retrying", attempt + 1,
                            self.cfg.error_retries + 1, exc_info=True)
        raise AssertionError("unreachable")

    def _make(self, batch: pd.DataFrame) -> pd.DataFrame:
        testing.maybe_fail("generation")  # a no-op outside the test suite
        rows = []
        groups = batch["sample"] // self.cfg.pipeline_batch_size
        for (pid, _), sub in batch.groupby([batch["prompt_id"], groups], sort=True):
            prompt = str(sub["prompt"].iloc[0])
            samples = group_samples(int(sub["sample"].iloc[0]), self.cfg.pipeline_batch_size)
            wanted = set(int(s) for s in sub["sample"])
            images = generate_group(self.pipe, self.cfg, prompt, samples)
            self.images_made += len(images)
            for s, im in zip(samples, images):
                if s not in wanted:
                    continue  # beyond samples_per_prompt, or already written
                data = encode_png(im)
                rel = image_path(int(pid), s)
                self.store.write_bytes(rel, data)
                rows.append((int(pid), prompt, s, seed_of(self.cfg.seed, prompt, s), image_id(int(pid), s), rel,
                             hashlib.sha256(data).hexdigest(), len(data)))
        return pd.DataFrame(rows, columns=MANIFEST_SCHEMA.names)


# --------------------------------------------------------------------------------------
# driver side: output folder, manifest, resume
# --------------------------------------------------------------------------------------


def read_record(store: Store, rel: str):
    """A JSON record of the output folder (:func:`tn_ray.storage.read_json`, naming it when it is not UTF-8 JSON)."""
    return read_json(store.uri(rel), "generation record", hint="restore it or use a new generation.out folder")


def check_output(store: Store, cfg: GenerationConfig, prompts: Sequence[str]) -> None:
    """Refuse a rerun whose image-fixing parameters or prompt ids differ; record them otherwise."""
    params = cfg.fingerprint()
    if store.exists("generation.json"):
        old = read_record(store, "generation.json")
        diff = [f"generation.{k}: {old.get(k)!r} in {store.uri('generation.json')}, {v!r} now"
                for k, v in params.items() if old.get(k) != v]
        if diff:
            raise GenerationMismatch(
                "the output folder holds images made with other parameters:\n  "
                + "\n  ".join(diff)
                + "\nuse a new generation.out folder, or restore these values"
            )
    else:
        store.write_text("generation.json", json.dumps(params, indent=1))
    known: list[str] = read_record(store, "prompts.json") if store.exists("prompts.json") else []
    if not isinstance(known, list) or not all(isinstance(p, str) for p in known):
        raise InputError(
            f"{store.uri('prompts.json')}: expected a JSON list of prompts; restore it or use a new "
            "generation.out folder"
        )
    clash = [(i, a, b) for i, (a, b) in enumerate(zip(known, prompts)) if a != b]
    if clash:
        i, a, b = clash[0]
        raise GenerationMismatch(
            f"prompt_id {i} is {a!r} in {store.uri('prompts.json')} but {b!r} now "
            f"({len(clash)} prompt ids differ); keep the prompt order or use a new generation.out "
            "folder"
        )
    if len(prompts) > len(known):
        store.write_text("prompts.json", json.dumps(list(prompts) + known[len(prompts) :], indent=1))


def manifest_table(store: Store) -> PartTable:
    return PartTable(store, "manifest", MANIFEST_SCHEMA, ["prompt_id", "sample"])


def read_manifest(store: Store) -> pd.DataFrame:
    """Every recorded image, one row per (prompt_id, sample)."""
    return manifest_table(store).read().sort_values(["prompt_id", "sample"]).reset_index(drop=True)


def image_damage(store: Store, row) -> str | None:
    """Why the recorded image ``row`` (a manifest row) cannot be reused, or None: the file is
    missing, or its size or sha256 differs from what the manifest recorded when it was made."""
    try:
        data = store.read_bytes(row.path)
    except FileNotFoundError:
        return "missing"
    if len(data) != int(row.bytes):
        return f"{len(data)} bytes, the manifest recorded {int(row.bytes)}"
    if hashlib.sha256(data).hexdigest() != row.sha256:
        return "sha256 differs from the manifest's"
    return None


def drop_damaged(store: Store, manifest: pd.DataFrame, threads: int = 8) -> tuple[pd.DataFrame, set[tuple[int, int]]]:
    """(``manifest`` without the images that fail :func:`image_damage`, their (prompt_id, sample)):
    their rows are removed from the stored manifest too, so they are made again; each is named
    in the log."""
    from concurrent.futures import ThreadPoolExecutor

    if manifest.empty:
        return manifest, set()
    with ThreadPoolExecutor(threads) as pool:
        problems = list(pool.map(lambda r: image_damage(store, r), manifest.itertuples(index=False)))
    bad = [i for i, why in enumerate(problems) if why]
    if not bad:
        return manifest, set()
    shown = "; ".join(f"{store.uri(manifest['path'].iloc[i])}: {problems[i]}" for i in bad[:5])
    log.warning(
        "%d of %d recorded images are damaged and will be generated again: %s%s",
        len(bad),
        len(manifest),
        shown,
        " ..." if len(bad) > 5 else "",
    )
    kept = manifest.drop(index=manifest.index[bad]).reset_index(drop=True)
    manifest_table(store).rewrite(kept)
    return kept, {(int(manifest["prompt_id"].iloc[i]), int(manifest["sample"].iloc[i])) for i in bad}


def adopt_orphans(
    store: Store,
    cfg: GenerationConfig,
    prompts: Sequence[str],
    manifest: pd.DataFrame,
    damaged: set[tuple[int, int]] = frozenset(),
) -> pd.DataFrame:
    """Manifest rows for complete image files that a killed driver never recorded (a file that
    does not decode, or one found damaged, is left out, and so made again)."""

    have = set(zip(manifest["prompt_id"].tolist(), manifest["sample"].tolist())) | set(damaged)
    rows = []
    for rel in store.list_files("images", ".png"):
        m = _IMAGE_RE.match(rel)
        if not m:
            continue
        pid, s = int(m.group(1)), int(m.group(2))
        if (pid, s) in have or pid >= len(prompts) or s >= cfg.samples_per_prompt:
            continue
        why = image_problem(store.uri(rel))
        if why:
            log.warning("unrecorded image %s does not decode (%s); it will be generated again", store.uri(rel), why)
            continue
        data = store.read_bytes(rel)
        rows.append(
            (
                pid,
                prompts[pid],
                s,
                seed_of(cfg.seed, prompts[pid], s),
                image_id(pid, s),
                rel,
                hashlib.sha256(data).hexdigest(),
                len(data),
            )
        )
    return pd.DataFrame(rows, columns=MANIFEST_SCHEMA.names)


def work_units(todo: pd.DataFrame, group_size: int, batch_size: int) -> list[pd.DataFrame]:
    """Split the rows to make into Ray blocks of whole pipeline groups, about ``batch_size`` rows each."""
    units, current, size = [], [], 0
    keys = todo["sample"] // group_size
    for _, g in todo.groupby([todo["prompt_id"], keys], sort=True):
        if current and size + len(g) > batch_size:
            units.append(pd.concat(current, ignore_index=True))
            current, size = [], 0
        current.append(g)
        size += len(g)
    if current:
        units.append(pd.concat(current, ignore_index=True))
    return units


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def roll_folder(store: Store) -> str:
    """A folder on the driver's node where each generation actor of ``store``'s run writes ``<node>:<pid>`` as it
    starts (:func:`answer_roll`): the driver waits for every one of them, also those that made no image (one
    work unit can keep a second actor idle until the dataset ends)."""
    digest = hashlib.sha256(store.uri("").encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"tn_ray_generation_actors_{os.getuid()}_{digest}")


def answer_roll(roll: str | None, process: str) -> None:
    """An actor's ``<node>:<pid>`` into the driver's roll folder, when this node has it (the driver's node)."""
    if roll and os.path.isdir(roll):
        try:
            open(os.path.join(roll, process), "w").close()
        except OSError:
            pass


def wait_for_exit(workers: set[str], timeout_s: float = 120.0) -> None:
    """Wait until this node's generation actors have exited (Ray Data releases them when the
    dataset is done; their processes take a few seconds to free the pipeline's memory). Then the
    reward actors that follow never share a node's memory, or a GPU, with a dying pipeline."""
    node = _node_id()
    pids = [int(w.split(":")[1]) for w in workers if w.split(":")[0] == node]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if _running(p)]
        if not alive:
            return
        time.sleep(0.1)
    log.info("generation actors %s still exiting after %.0f s; going on", alive, timeout_s)


def prepare(prompts: Sequence[str], cfg: GenerationConfig) -> tuple[Store, pd.DataFrame, pd.DataFrame]:
    """Check the request and the output folder, resume what is there; returns (store, wanted,
    todo): every (prompt_id, prompt, sample) asked for, and those still to make (with seed)."""
    if cfg.out is None:
        raise InputError("generation.out is not set: where should the images go?")
    prompts = list(prompts)
    if not prompts:
        raise InputError("no prompts to generate images for")
    dup = pd.Series(prompts)[pd.Series(prompts).duplicated()]
    if len(dup):
        raise InputError(f"prompt {dup.iloc[0]!r} is listed twice; prompts must be unique")
    check_source(cfg.pipeline, cfg.revision)
    check_scheduler(cfg.scheduler)
    store = Store(cfg.out)
    check_output(store, cfg, prompts)
    stale = store.remove_temporaries("images") + store.remove_temporaries("manifest")
    if stale:
        log.info("removed %d temporaries left by an interrupted run", stale)
    manifest, damaged = drop_damaged(store, read_manifest(store))  # what is reused is verified (size, sha256)
    orphans = adopt_orphans(store, cfg, prompts, manifest, damaged)
    if len(orphans):
        log.info("adopted %d complete images written but not recorded by an interrupted run", len(orphans))
        manifest_table(store).append(orphans)
        manifest = read_manifest(store)

    wanted = pd.DataFrame(
        [(i, p, s) for i, p in enumerate(prompts) for s in range(cfg.samples_per_prompt)],
        columns=["prompt_id", "prompt", "sample"],
    )
    done = manifest[["prompt_id", "sample"]].assign(_done=True)
    todo = wanted.merge(done, on=["prompt_id", "sample"], how="left")
    todo = todo[todo["_done"].isna()].drop(columns="_done").reset_index(drop=True)
    todo["seed"] = [seed_of(cfg.seed, p, s) for p, s in zip(todo["prompt"], todo["sample"])]
    log.info(
        "generation: %d prompts x %d samples; %d images on disk, %d to make",
        len(prompts),
        cfg.samples_per_prompt,
        len(wanted) - len(todo),
        len(todo),
    )
    return store, wanted, todo


def generation_dataset(
    todo: pd.DataFrame, cfg: GenerationConfig, store: Store, n_actors: int, resources: dict[str, float]
):
    """The Ray Data dataset that makes ``todo`` on a pool of ``n_actors`` :class:`GenerationWorker`
    actors (``resources`` each), one work unit of whole pipeline groups per call; its rows are
    manifest rows; each actor answers :func:`roll_folder` as it starts."""
    import ray
    from ray.data import ActorPoolStrategy

    units = work_units(todo, cfg.pipeline_batch_size, cfg.batch_size)
    roll = roll_folder(store)
    shutil.rmtree(roll, ignore_errors=True)  # a killed run's roll: those processes are gone
    os.makedirs(roll)
    return ray.data.from_pandas(units).map_batches(
        GenerationWorker,
        fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "out": store.uri(""), "roll": roll},
        # one work unit per call (Ray Data needs an explicit batch size for GPU actors)
        batch_size=max(len(u) for u in units),
        batch_format="pandas",
        compute=ActorPoolStrategy(size=n_actors),
        **resources,
    )


def record(
    ds, store: Store, total: int, desc: str, before_manifest: Callable[[pd.DataFrame], None] | None = None
) -> None:
    """Consume ``ds`` (rows: manifest rows of finished images) and append each finished batch to
    the manifest as one part, after ``before_manifest(rows)`` (say, storing their rewards: an
    interruption between the two leaves images that the next run adopts). Returns once the
    generation actors of this node have exited."""
    from tqdm.auto import tqdm

    batches = ds.iter_batches(batch_format="pandas", batch_size=None)
    try:
        with tqdm(total=total, desc=desc, unit="img") as bar:
            for rows in batches:
                if before_manifest is not None:
                    before_manifest(rows)
                manifest_table(store).append(rows)
                bar.update(len(rows))
    finally:
        close = getattr(batches, "close", None)
        if close is not None:  # on an error too: stop the execution and release its actors now
            close()
    del ds, batches
    roll = roll_folder(store)
    wait_for_exit(set(os.listdir(roll)) if os.path.isdir(roll) else set())
    shutil.rmtree(roll, ignore_errors=True)


def finish(store: Store, wanted: pd.DataFrame) -> pd.DataFrame:
    """The manifest of every wanted image (compacted), with ``image``: a path or URI any worker can open."""
    manifest_table(store).compact()
    manifest = read_manifest(store)
    out = wanted[["prompt_id", "sample"]].merge(manifest, on=["prompt_id", "sample"], how="left")
    if out["path"].isna().any():
        raise RuntimeError(f"{int(out['path'].isna().sum())} images are still missing from {store.uri('manifest')}")
    out["image"] = [store.uri(p) for p in out["path"]]
    return out


def generate(prompts: Sequence[str], cfg: GenerationConfig, ray_cfg: RayConfig | None = None) -> pd.DataFrame:
    """Make every missing (prompt, sample < samples_per_prompt) image; return the manifest of all.

    The returned frame (sorted by prompt_id, sample) adds ``image``: a path or URI that any
    worker can open.
    """
    from tn_ray.cluster import actor_pool, init_ray

    store, wanted, todo = prepare(prompts, cfg)
    if len(todo):
        init_ray(ray_cfg)
        n_units = len(work_units(todo, cfg.pipeline_batch_size, cfg.batch_size))
        n_actors, resources = actor_pool(
            cfg.num_actors, cfg.gpus_per_actor, cfg.cpus_per_actor, fill_cpus=True, max_actors=n_units
        )
        record(
            generation_dataset(todo, cfg, store, n_actors, resources),
            store,
            len(todo),
            f"generating ({n_actors} actors)",
        )
    return finish(store, wanted)
