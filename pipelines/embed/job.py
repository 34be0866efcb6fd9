"""The driver side of ``thinkfast embed``: checks, clean-up, the Ray Data streams, manifest.

Everything that can be wrong with the input (corpus schema, repeated keys, model
directories, flags, an ``--out`` that cannot be written) is checked here before Ray starts and before anything under ``--out`` is deleted, so a
typo costs one clear line, not a cleared output directory. See ``pipelines/embed/__init__.py``
for the layout, the memory bound and the re-run policy.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from thinkfast.store.incremental import write_digests
from thinkfast.store.layout import (
    DIGESTS_FILE,
    EMBED_MANIFEST,
    FAILED_EMBED_MANIFEST,
    INCREMENTAL_MARKER,
    FAST_DIR,
    REJECTED_DIR,
    TEXTS_DIR,
    TOKENS_DIR,
    EmbedCounts,
    EmbedManifest,
    EmbedOutputs,
    rejected_dir,
    tokens_dir,
    write_embed_manifest,
)
from thinkfast.store.outputs import clear_embed_outputs, files_inside_outputs
from thinkfast.utils import fs
from thinkfast.utils.devices import Placement
from thinkfast.utils.timer import StageTimer
from thinkfast_pipelines.embed.config import EmbedConfig, EmbedError
from thinkfast_pipelines.embed.duplicates import DUPLICATE_REASON, DuplicatePlan, check_duplicates
from thinkfast_pipelines.embed.incremental import (
    IncrementalPlan,
    check_same_models,
    committed_digests,
    corpus_digests,
    plan_run,
    previous_manifest,
)
from thinkfast_pipelines.embed.models import DEFAULT_NUM_FRAMES, ModelInfo, probe_models  # noqa: F401 - old home
from thinkfast_pipelines.ray_utils import placement_for

if TYPE_CHECKING:
    import ray.data

    from thinkfast.data.reader import CorpusInfo

logger = logging.getLogger(__name__)

FAILED_MANIFEST = FAILED_EMBED_MANIFEST  # old name


# --------------------------------------------------------------------------- checks


def clear_outputs(out: str, s3_endpoint: str | None) -> list[str]:
    """Delete the previous run's outputs (:func:`thinkfast.store.outputs.clear_embed_outputs`);
    a module-level name so that tests can forbid it."""
    return clear_embed_outputs(out, s3_endpoint)


def _check_out_not_inside_corpus(corpus_files: tuple[str, ...], out: str) -> None:
    """Clearing --out must never delete corpus files."""
    for f, directory in files_inside_outputs(corpus_files, out)[:1]:
        raise EmbedError(f"the corpus file {f} lies inside {directory}, which embed replaces; choose another --out")


# --------------------------------------------------------------------------- Ray Data


# smallest block target: below this, per-block overhead outweighs any gain in latency
MIN_BLOCK_BYTES = 1024**2


def decoded_row_bytes(models: ModelInfo, media: str) -> int:
    """Bytes of one decoded row as it travels to the actors: float32 (3, S, S), × F for video."""
    frames = models.num_frames if media == "mp4" else 1
    return 4 * 3 * models.image_size**2 * frames


@contextmanager
def _data_context(config: EmbedConfig, row_bytes: int) -> Iterator[None]:
    """Ray Data settings for this job only (the DataContext is process-wide; the demo and
    tests run several jobs in one driver, so the previous values come back afterwards).

    The block target is one model batch of decoded rows: Ray Data's default (128 MiB)
    would let a decode task pack a whole Parquet file into one block, so the actors would
    wait for the entire file to be decoded (no pipelining) and one block could hold
    thousands of images. With one batch per block, decode and embed overlap and each
    block in flight costs ``batch_size`` × ``row_bytes``."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.execution_options.resource_limits, ctx.target_max_block_size)
    saved_retries = fs.bound_ray_data_retries(ctx)  # a dead endpoint fails in bounded time, not 10 x 32 s
    ctx.enable_progress_bars = config.progress
    ctx.target_max_block_size = max(MIN_BLOCK_BYTES, config.batch_size * row_bytes)
    if config.object_store_limit_mb:
        limits = ctx.execution_options.resource_limits
        ctx.execution_options.resource_limits = limits.copy(object_store_memory=config.object_store_limit_mb * 1024**2)
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.execution_options.resource_limits, ctx.target_max_block_size = saved
        ctx.retried_io_errors = list(saved_retries)


def embed_placement(config: EmbedConfig) -> Placement:
    """Where the model actors go (Ray must be up: on GPU the pool is sized to what the
    cluster reports). The CPU path is ``--actors`` actors with no GPU request, as before."""
    return placement_for(config.uses_gpu, num_gpus=config.num_gpus, gpus_per_actor=config.gpus_per_actor,
                         actors=config.actors, amp=config.amp)


def _actor_resources(config: EmbedConfig, placement: Placement) -> dict[str, Any]:
    """``map_batches`` resource options of one model actor: its CPUs, and its GPUs
    (``num_gpus``, or the test's custom resource) when placed on GPU."""
    return {"num_cpus": config.cpus_per_actor, **placement.ray_options()}


def _read(corpus: CorpusInfo, columns: list[str], config: EmbedConfig,
          duplicates: DuplicatePlan | None = None, skip: frozenset[str] = frozenset()) -> "ray.data.Dataset":
    """The corpus rows (``columns``), each key at most once: with a duplicate plan, the
    rows of repeated keys are dropped and the kept copies added back; then the keys in
    ``skip`` (already embedded, removed: see ``incremental.py``) are dropped."""
    import ray.data

    from thinkfast.store.stream import drop_keys
    from thinkfast_pipelines.embed.duplicates import kept_rows
    from thinkfast_pipelines.embed.stages import read_corpus

    columns = corpus.columns.stream_columns(columns)  # + img2dataset's status, error_message
    ds = read_corpus(corpus, columns, config.s3_endpoint)  # Parquet or img2dataset webdataset
    if config.limit is not None:
        ds = ds.limit(config.limit)
    if duplicates is not None:
        ds = ds.map_batches(drop_keys, batch_format="pyarrow", batch_size=None, fn_kwargs={"keys": duplicates.drop})
        if duplicates.keep:
            kept = kept_rows(duplicates, columns, config.s3_endpoint)
            ds = ds.union(ray.data.from_arrow(kept))
    if skip:
        ds = ds.map_batches(drop_keys, batch_format="pyarrow", batch_size=None, fn_kwargs={"keys": skip})
    return ds


def run_media_stream(corpus: CorpusInfo, models: ModelInfo, out: str, config: EmbedConfig,
                     duplicates: DuplicatePlan | None = None, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """read ─► decode (tasks) ─► EmbedActor (pool) ─► EmbeddingSink; returns the sink's counts."""
    import ray.data

    from thinkfast_pipelines.embed.sink import EmbeddingSink
    from thinkfast_pipelines.embed.stages import EmbedActor, decode_batch

    placement = embed_placement(config)
    ds = _read(corpus, ["key", corpus.columns.media], config, duplicates, skip)
    ds = ds.map_batches(
        decode_batch,
        batch_format="pyarrow",
        batch_size=config.decode_batch_size,
        fn_kwargs={
            "columns": corpus.columns,
            "image_size": models.image_size,
            "num_frames": models.num_frames,
            "max_pixels": config.max_pixels,
            "s3_endpoint": config.s3_endpoint,
        },
    )
    ds = ds.map_batches(
        EmbedActor,
        batch_format="pyarrow",
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=placement.actors, max_tasks_in_flight_per_actor=2),
        fn_constructor_kwargs={
            "fast_uri": models.fast.uri if models.fast else None,
            "slow_uri": models.slow.uri if models.slow else None,
            "device": placement.device,
            "threads": config.threads,
            "pool_size": placement.actors,
            "amp": placement.amp,
        },
        **_actor_resources(config, placement),
    )
    sink = EmbeddingSink(out, kind="media", rows_per_write=config.rows_per_write, s3_endpoint=config.s3_endpoint,
                         token_format=config.token_format)
    ds.write_datasink(sink)
    return {**sink.result, "steady_rows_per_s": sink.steady_rows_per_s()}


def run_text_stream(corpus: CorpusInfo, fast_uri: str, out: str, config: EmbedConfig,
                    duplicates: DuplicatePlan | None = None, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """read captions ─► one row per caption ─► TextEmbedActor (pool) ─► texts/."""
    import ray.data

    from thinkfast_pipelines.embed.sink import EmbeddingSink
    from thinkfast_pipelines.embed.stages import TextEmbedActor, explode_captions

    caption_column = corpus.columns.captions
    placement = embed_placement(config)
    ds = _read(corpus, ["key", caption_column], config, duplicates, skip)
    ds = ds.map_batches(explode_captions, batch_format="pyarrow", fn_kwargs={"caption_column": caption_column})
    ds = ds.map_batches(
        TextEmbedActor,
        batch_format="pyarrow",
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=placement.actors, max_tasks_in_flight_per_actor=2),
        fn_constructor_kwargs={
            "fast_uri": fast_uri,
            "device": placement.device,
            "threads": config.threads,
            "pool_size": placement.actors,
        },
        **_actor_resources(config, placement),
    )
    sink = EmbeddingSink(out, kind="texts", rows_per_write=config.rows_per_write, s3_endpoint=config.s3_endpoint)
    ds.write_datasink(sink)
    return sink.result


# --------------------------------------------------------------------------- the job


def run_embed(
    corpus_uri: str,
    out: str,
    fast: str | None,
    slow: str | None,
    *,
    texts: bool,
    media: bool,
    config: EmbedConfig,
    address: str | None,
) -> dict[str, Any]:
    """The whole job (see :func:`thinkfast_pipelines.embed.embed`, which validates the
    arguments); returns the manifest as written (JSON)."""
    from thinkfast_pipelines.ray_utils import init_ray
    from thinkfast.data.reader import inspect_corpus

    timer = StageTimer(logger)
    endpoint = config.s3_endpoint
    with timer.stage("inspect"):
        corpus = inspect_corpus(corpus_uri, endpoint, webdataset=True)
        _check_out_not_inside_corpus(corpus.files, out)
        duplicates = check_duplicates(corpus, config)
        models = probe_models(fast, slow if media else None, corpus.columns.media, config)
        # an unreachable endpoint, a missing bucket or a read-only --out: one line in
        # seconds, before the clean-up and before Ray (not a Write-stage traceback later)
        fs.check_writable(out, endpoint)
        previous = None
        if config.incremental:
            if not media:
                raise EmbedError("--incremental embeds media: it cannot be combined with --no-media")
            previous = previous_manifest(out, endpoint)
            if previous is not None:
                check_same_models(previous, models, texts=texts, out=out, token_format=config.token_format)
    growing = previous is not None
    expected = corpus.num_rows if config.limit is None else min(config.limit, corpus.num_rows)
    logger.info("corpus %s: %d files, %d rows, media column %r", corpus_uri, len(corpus.files), corpus.num_rows, corpus.columns.media)

    with timer.stage("clear"):
        removed = [] if growing else clear_outputs(out, endpoint)  # removed.parquet stays: deletes stick
    with timer.stage("ray_init"):
        init_ray(address=address)
    plan = None
    if media and config.limit is None:
        with timer.stage("digests"):
            digests = corpus_digests(corpus, config, duplicates)
            if growing:  # from here the directory reads as unfinished; the marker keeps the old manifest
                fs.write_json(fs.join(out, INCREMENTAL_MARKER), previous.to_json(), endpoint)
                fs.fsspec_fs(out, endpoint).rm_file(fs.strip_scheme(fs.join(out, EMBED_MANIFEST)))
            plan = plan_run(out, digests, config, duplicates, incremental=growing)
    elif fs.exists(fs.join(out, DIGESTS_FILE), endpoint):  # --limit: no digests; stale ones would mislead
        fs.fsspec_fs(out, endpoint).rm_file(fs.strip_scheme(fs.join(out, DIGESTS_FILE)))
    with _data_context(config, decoded_row_bytes(models, corpus.columns.media)):
        counts, token_manifest, steady = _run_streams(corpus, models, out, config, timer, fast=fast,
                                                      media=media, texts=texts, expected=expected,
                                                      duplicates=duplicates, plan=plan, growing=growing)

    manifest = _manifest(corpus, models, counts, config, media=media, texts=texts, has_tokens=token_manifest is not None)
    manifest = manifest.replace(replaced_previous=tuple(removed),
                                media_steady_rows_per_s=None if steady is None else round(steady, 2))
    _check_counts(manifest, token_manifest, out, endpoint, timer)
    with timer.stage("manifest"):
        if plan is not None:  # the digests are the commit point for keys, the manifest for the run
            committed = committed_digests(out, plan, endpoint)
            write_digests(out, committed, endpoint)
            runs = int((previous.incremental or {}).get("runs", 1)) + 1 if growing else 1
            manifest = manifest.replace(incremental={**plan.stats, "total_embedded": len(committed), "runs": runs})
            if growing and fs.exists(rejected_dir(out), endpoint):
                manifest = manifest.replace(outputs=dataclasses.replace(manifest.outputs, rejected=REJECTED_DIR))
        manifest = manifest.replace(timings_s=timer.as_dict())
        write_embed_manifest(out, manifest, endpoint)
        if growing:
            fs.fsspec_fs(out, endpoint).rm_file(fs.strip_scheme(fs.join(out, INCREMENTAL_MARKER)))
    logger.info("embed done: %s", manifest.counts)
    return manifest.to_json()


def _run_streams(corpus: CorpusInfo, models: ModelInfo, out: str, config: EmbedConfig, timer: StageTimer, *,
                 fast: str | None, media: bool, texts: bool, expected: int,
                 duplicates: DuplicatePlan | None = None, plan: IncrementalPlan | None = None,
                 growing: bool = False) -> tuple[EmbedCounts, dict[str, Any] | None, float | None]:
    """The media stream, the token store's index, then the caption stream; their counts.
    The driver's own rejects of repeated keys are written first and counted with the
    media stream's (so ``embedded + rejected == in`` holds as for any other reject)."""
    media_result = text_result = None
    token_manifest = None
    skip = plan.skip if plan is not None else frozenset()
    steady = None
    if media:
        with timer.stage("embed_media"):
            media_result = run_media_stream(corpus, models, out, config, duplicates, skip)
            if duplicates is not None and duplicates.rejects.num_rows:
                from thinkfast.store.outputs import write_rejected

                n = duplicates.rejects.num_rows
                write_rejected(out, duplicates.rejects, config.s3_endpoint)
                media_result = dict(media_result)
                for name in ("rows", "rejected", f"rejected:read:{DUPLICATE_REASON}"):
                    media_result[name] = int(media_result.get(name, 0)) + n
        steady = media_result.get("steady_rows_per_s")
        if models.slow and (media_result.get("embedded") or (growing and fs.exists(tokens_dir(out), config.s3_endpoint))):
            from thinkfast.store.tokens import finalize_token_store

            with timer.stage("finalize_tokens"):
                token_manifest = finalize_token_store(tokens_dir(out), config.s3_endpoint)
    if texts:
        with timer.stage("embed_texts"):
            text_result = run_text_stream(corpus, fast, out, config, duplicates, skip)
    counts = EmbedCounts.from_streams(expected, media_result, text_result)
    if plan is not None:
        counts = dataclasses.replace(counts, skipped=plan.skipped_rows)
    return counts, token_manifest, steady


def _manifest(corpus: CorpusInfo, models: ModelInfo, counts: EmbedCounts, config: EmbedConfig, *,
              media: bool, texts: bool, has_tokens: bool) -> EmbedManifest:
    """``manifest.json`` minus timings: what was read, with which models, what came out."""
    may_be_video = corpus.columns.media in ("mp4", "url")
    return EmbedManifest(
        corpus=str(corpus.uri),
        corpus_files=len(corpus.files),
        media_column=corpus.columns.media if media else None,
        image_size=models.image_size,
        num_frames=models.num_frames if may_be_video else None,
        fast=models.fast,
        slow=models.slow,
        outputs=EmbedOutputs(
            fast=FAST_DIR if media and models.fast else None,
            tokens=TOKENS_DIR if has_tokens else None,
            rejected=REJECTED_DIR if media and counts.rejected else None,
            texts=TEXTS_DIR if texts else None,
        ),
        counts=counts,
        config=config.to_manifest(),
    )


def _check_counts(manifest: EmbedManifest, token_manifest: dict[str, Any] | None, out: str,
                  endpoint: str | None, timer: StageTimer) -> None:
    """Every input row must be in fast/ or rejected/ exactly once; if not, keep the
    evidence in ``failed_manifest.json`` (no ``manifest.json``: the run is unfinished)."""
    duplicates = int((token_manifest or {}).get("duplicates_dropped") or 0)
    problem = manifest.counts.problem(duplicates)
    if problem is None:
        return
    failed = manifest.replace(error=problem, timings_s=timer.as_dict())
    path = write_embed_manifest(out, failed, endpoint, name=FAILED_EMBED_MANIFEST)
    raise EmbedError(f"{problem}; see {path}")
