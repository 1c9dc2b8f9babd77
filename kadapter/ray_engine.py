"""``engine: ray`` for the data stages: the same per-file and per-batch functions as the
local engine (kadapter/trex.py, kadapter/deps.py), scheduled on a Ray cluster.

- T-REx, on Ray Data: a dataset of the input files; ``map_batches`` runs
  ``trex.scan_table`` once per file and gives one row per file (its pickled scan, and its
  entity counts and candidates as Arrow list columns: Arrow blocks in Ray's object
  store, no spill file). The driver looks at each file's scan as its block comes out,
  in input order, so the first bad file stops the run (the scans still running are
  cancelled) and is the one the local engine reports. ``Dataset.aggregate`` with two
  custom aggregations sums the entity counts and collects the distinct (relation,
  subject, object) pairs: each block gives a partial table, one reduce task merges
  them (the sort-based pull shuffle, which with no key moves only the partial tables;
  Ray Data's default hash shuffle starts aggregator actors, ~4 s per aggregation on a
  2-CPU local Ray). The entity filter and the relation filter and labels are
  ``map_batches`` steps over the blocks; the driver splits each file's rows and writes
  them in input-file order, the same Parquet row groups as the local engine.
- Dependencies: the driver finds the local engine's batches as byte ranges of the input
  (``deps.line_batches``, counting newlines); Ray Data ``map_batches`` over an actor
  pool of ``workers`` parsers (with stanza each takes ``gpus_per_parser`` GPUs) reads,
  parses, filters and splits each batch (``deps.process_batch``) and writes its own
  Parquet pieces; the driver joins the pieces into train/dev.parquet in input order.
  Several batches go in one Ray Data block (one task): with one block per batch the
  scheduling left the parser idle ~12 ms between batches, ~11% of the time.

Failed tasks are retried by Ray Data (a killed worker process included, as often as it
takes); the results are gathered in input order (Ray Data's ``preserve_order``, checked
on the T-REx file index), so the bytes do not depend on scheduling.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kadapter import trex
from kadapter.io import InputError

MAX_BATCHES_PER_BLOCK = 16  # dependency batches (``batch_size`` lines each) per Ray Data block
BLOCKS_PER_PARSER = 4  # at least this many blocks per parser actor, when there are batches enough


@contextlib.contextmanager
def ray_session(address: str | None, workers: int) -> Iterator[None]:
    """A connected Ray: the one already initialised in this process (left running), a
    cluster at ``address`` (``auto``: RAY_ADDRESS or the local head), or else a local
    Ray with ``workers`` CPUs, shut down afterwards."""
    import ray

    if ray.is_initialized():
        yield
        return
    if address is None:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- T-REx


def data_context(dataset: Any, progress: bool = False) -> Any:
    """Set this project's Ray Data options on a source dataset's own context (the
    datasets made from it share it): results in input order, and aggregations as one
    map task per block and one reduce task (the sort-based pull shuffle: with no key it
    sorts nothing; the default hash shuffle starts aggregator actors, ~4 s each time)."""
    from ray.data.context import ShuffleStrategy

    context = dataset.context
    context.execution_options.preserve_order = True
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    context.enable_progress_bars = progress
    return dataset


def _scan_files(batch: pa.Table, seed: int, dev_fraction: float, exclude: frozenset[str],
                on_error: str) -> pa.Table:
    """Pass 1 on the files of a batch (``trex.scan_table``), one row per file: its index,
    the pickled scan (stats, error, docid hashes), its entity mention counts and its
    candidates, as Arrow list columns."""
    import pickle

    rows = []
    for file, path, skip in zip(batch["file"].to_pylist(), batch["path"].to_pylist(),
                                batch["skip"].to_pylist()):
        scan, table = trex.scan_table(path, seed, dev_fraction, exclude, on_error,
                                      frozenset(skip))
        counts, scan.entity_counts = scan.entity_counts, None
        table = trex.SPILL_SCHEMA.empty_table() if table is None else table
        rows.append(pa.table({
            "file": pa.array([file], pa.int32()),
            "scan": pa.array([pickle.dumps(scan)], pa.binary()),
            "entity": _one_list(pa.array(list(counts), pa.string())),
            "count": _one_list(pa.array(list(counts.values()), pa.int64())),
            "candidates": _one_list(table.to_struct_array().combine_chunks()),
        }))
    return pa.concat_tables(rows)


def _one_list(values: pa.Array) -> pa.ListArray:
    """A list column of one row holding ``values``."""
    return pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)


def _without_files(block: pa.Table, files: list[int]) -> pa.Table:
    return block.filter(pc.invert(pc.is_in(block["file"], value_set=pa.array(files, pa.int32()))))


def _candidates(block: pa.Table) -> pa.Table:
    """The candidate rows of a block of scanned files, with their file index."""
    lists = block["candidates"].combine_chunks()
    table = pa.Table.from_struct_array(lists.flatten())
    files = pc.take(block["file"], pc.list_parent_indices(lists))
    return table.append_column("file", files)


def _filter_block(block: pa.Table, kept_entities: Any) -> pa.Table:
    import ray

    return trex.entity_filter(_candidates(block), ray.get(kept_entities))


def _label_block(block: pa.Table, kept_relations: Any) -> pa.Table:
    import ray

    return trex.label(block, ray.get(kept_relations))


def _sum_counts(table: pa.Table) -> pa.Table:
    return table.group_by("entity").aggregate([("count", "sum")]).rename_columns(["entity", "count"])


def _aggregations() -> tuple[type, type]:
    """The two Ray Data aggregations of the stage (classes made here: ``ray.data`` is
    imported only with ``engine: ray``). Each block gives a partial table, and the
    partial tables are merged: no row of candidates is shuffled."""
    from ray.data.aggregate import AggregateFnV2

    class EntityCounts(AggregateFnV2):
        """Mentions per entity over the scanned files: a table (entity, count)."""

        def __init__(self):
            super().__init__("entity_counts", zero_factory=_no_counts, on=None,
                             ignore_nulls=False)

        def aggregate_block(self, block: pa.Table) -> pa.Table:
            return _sum_counts(pa.table({"entity": pc.list_flatten(block["entity"]),
                                         "count": pc.list_flatten(block["count"])}))

        def combine(self, current: pa.Table, new: pa.Table) -> pa.Table:
            return _sum_counts(pa.concat_tables([current, new]))

    class DistinctPairs(AggregateFnV2):
        """The distinct (relation, subject, object) triples of the filtered candidates."""

        def __init__(self):
            super().__init__("pairs", zero_factory=_no_pairs, on=None, ignore_nulls=False)

        def aggregate_block(self, block: pa.Table) -> pa.Table:
            return trex.distinct_pairs(block)

        def combine(self, current: pa.Table, new: pa.Table) -> pa.Table:
            return trex.distinct_pairs(pa.concat_tables([current, new]))

    return EntityCounts, DistinctPairs


def _no_counts() -> pa.Table:
    return pa.table({"entity": pa.array([], pa.string()), "count": pa.array([], pa.int64())})


def _no_pairs() -> pa.Table:
    return trex.distinct_pairs(trex.SPILL_SCHEMA.empty_table())


def _scans_of(block: pa.Table) -> list[tuple[int, Any]]:
    """The (file index, scan) of each file of a scanned block."""
    import pickle

    return [(file, pickle.loads(scan))
            for file, scan in zip(block["file"].to_pylist(), block["scan"].to_pylist())]


def _checked_in_order(scanned: Any) -> tuple[Any, dict[int, Any]]:
    """Run the scan; return the scanned dataset (materialized: its blocks stay in the
    object store) and each file's scan. Each block is looked at here as it comes out,
    in input order (zero-copy on this node; from another node its candidate table,
    ~10% of the file's size, travels here): the first file with an error stops the run
    (the scans still running are cancelled) and is reported, the same file as on the
    local engine."""
    import ray
    import ray.data

    blocks, scans = [], {}
    bundles = scanned.iter_internal_ref_bundles()
    try:
        for bundle in bundles:
            for block in bundle.block_refs:
                for file, scan in _scans_of(ray.get(block)):
                    if scan.error:
                        raise InputError(*scan.error)
                    scans[file] = scan
                blocks.append(block)
    finally:
        # After an error, the scans still running stop: Ray Data shuts its executor down
        # when the last reference to the bundle iterator goes (the traceback would keep
        # this frame's reference for as long as the error is held).
        del bundles
    return data_context(ray.data.from_arrow_refs(blocks)), scans


class RayTrex:
    """The T-REx stage's passes on Ray Data (see ``trex.LocalTrex`` for the local ones):
    files -> one row of Arrow list columns per file (its counts and candidates) ->
    ``Dataset.aggregate`` of the entity counts -> entity filter (candidate rows) ->
    ``Dataset.aggregate`` of the distinct relation pairs -> relation filter and labels ->
    the driver splits and writes each file's rows in input order."""

    def __init__(self, paths: list, config: trex.TrexConfig, seed: int, progress: bool):
        self.paths, self.config, self.seed, self.progress = paths, config, seed, progress
        self.session = ray_session(config.ray_address, config.workers)
        self.session.__enter__()
        self.scanned = self.filtered = None
        self.scans: dict[int, Any] = {}  # file index -> its scan (``trex.FileScan``)

    def scan(self, skips: dict[int, frozenset[str]],
             before: dict[int, frozenset[str]] | None = None) -> tuple[Any, int, list]:
        """Pass 1, one Ray Data task per file (see ``trex.LocalTrex.scan``); the scanned
        files stay in Ray's object store. With ``before``, only the files whose skips
        changed are parsed again, and their rows replace the earlier ones."""
        import ray.data

        config = self.config
        files = [i for i in range(len(self.paths))
                 if before is None or skips.get(i, frozenset()) != before.get(i, frozenset())]
        items = ray.data.from_items(
            [{"file": i, "path": str(self.paths[i]), "skip": sorted(skips.get(i, ()))}
             for i in files], override_num_blocks=len(files))
        scanned, scans = _checked_in_order(data_context(items, self.progress).map_batches(
            _scan_files, batch_size=1, batch_format="pyarrow",
            fn_kwargs={"seed": self.seed, "dev_fraction": config.dev_fraction,
                       "exclude": frozenset(config.exclude_relations),
                       "on_error": config.on_error}))
        self.scans.update(scans)
        if before is not None:  # the other files' rows, then the new ones, in file order
            others = self.scanned.map_batches(_without_files, batch_size=None,
                                              batch_format="pyarrow", fn_kwargs={"files": files})
            scanned = data_context(others.union(scanned).sort("file").materialize())
        self.scanned = scanned
        return trex._totals([self.scans[i] for i in range(len(self.paths))])

    def entity_totals(self, min_count: int) -> tuple[int, int, pa.Array]:
        entity_counts, _ = _aggregations()
        totals = self.scanned.aggregate(entity_counts())["entity_counts"]
        kept = totals.filter(pc.greater_equal(totals["count"], min_count))["entity"]
        kept = pc.take(kept, pc.sort_indices(kept)).combine_chunks()
        return pc.sum(totals["count"]).as_py() or 0, totals.num_rows, kept

    def filter_entities(self, kept_entities: pa.Array) -> tuple[int, dict[str, int]]:
        import ray

        _, distinct_pairs = _aggregations()
        self.filtered = self.scanned.map_batches(
            _filter_block, batch_size=None, batch_format="pyarrow",
            fn_kwargs={"kept_entities": ray.put(kept_entities)}).materialize()
        self.scanned = None
        pairs = self.filtered.aggregate(distinct_pairs())["pairs"]
        return self.filtered.count(), trex.pair_counts_of([pairs])

    def labelled_parts(self, kept_relations: pa.Array) -> Iterator[list[tuple[str, pa.Table]]]:
        """Each file's (split, part), in input-file order (files without rows left out)."""
        import ray

        labelled = self.filtered.map_batches(
            _label_block, batch_size=None, batch_format="pyarrow",
            fn_kwargs={"kept_relations": ray.put(kept_relations)})
        current, pieces = None, []
        for batch in labelled.iter_batches(batch_size=None, batch_format="pyarrow"):
            if not batch.num_rows:
                continue
            files = batch["file"].to_numpy()
            # runs of one file (a block can hold several files, a file span blocks)
            starts = [0, *(np.flatnonzero(files[1:] != files[:-1]) + 1).tolist()]
            for start, end in zip(starts, [*starts[1:], len(files)]):
                if files[start] != current:
                    if current is not None and files[start] < current:
                        raise AssertionError("Ray Data gave the files out of order")
                    if pieces:
                        yield trex.split_parts(pa.concat_tables(pieces).combine_chunks())
                    current, pieces = files[start], []
                pieces.append(batch.slice(start, end - start))
        if pieces:
            yield trex.split_parts(pa.concat_tables(pieces).combine_chunks())

    def close(self) -> None:
        self.scanned = self.filtered = None
        self.session.__exit__(None, None, None)


# --------------------------------------------------------------------------- dependencies


class _BatchParser:
    """A parser actor of the Ray Data pool: reads each batch's lines itself, runs
    ``deps.process_batch`` and writes the kept sentences as Parquet pieces (by a
    temporary name, then renamed: a retried batch rewrites its pieces whole)."""

    def __init__(self, files: list, config: Any, seed: int, pieces_dir: str):
        from kadapter import deps

        self.files, self.config, self.seed, self.pieces_dir = files, config, seed, pieces_dir
        self.parser = deps.make_parser(config, 0)  # Ray gives a GPU actor its own device 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        import orjson

        from kadapter import deps

        rows = []
        for index, segments in zip(batch["index"].to_pylist(), batch["segments"].to_pylist()):
            lines = deps.read_segments(self.files, [deps.Segment(*s) for s in orjson.loads(segments)],
                                       self.config.max_line_chars)
            result = deps.process_batch(lines, self.parser, self.config, self.seed)
            row = {"index": index,
                   "lines": orjson.dumps([(line.file, line.number, line.skip) for line in lines]),
                   "outcomes": orjson.dumps(result.outcomes)}
            for split, table in result.tables.items():
                row[split] = (write_piece(table, f"{self.pieces_dir}/{index:09d}-{split}.parquet")
                              if table.num_rows else "")
            rows.append(row)
        return pa.Table.from_pylist(rows)


def write_piece(table: pa.Table, path: str) -> str:
    import pyarrow.parquet as pq

    from kadapter.fs import filesystem_of

    fs, inner = filesystem_of(path)
    # The driver made the directory; once it has removed it (an early stop), a parser
    # still finishing a batch fails here instead of leaving a piece behind.
    partial = f"{inner}.partial"
    with fs.open(partial, "wb") as handle:
        pq.write_table(table, handle, compression="zstd")
    fs.mv(partial, inner)
    return path


def remove_pieces(fs: Any, directory: str, attempts: int = 100) -> None:
    """Remove the pieces directory. After an early stop the parsers are being killed and
    one may still be writing or renaming a piece while the directory is removed (a file
    vanishes, or appears, under the removal): try again until a removal succeeds."""
    import time

    for attempt in range(attempts):
        try:
            if fs.exists(directory):
                fs.rm(directory, recursive=True)
            return
        except OSError:  # FileNotFoundError, or "directory not empty" after a late write
            if attempt == attempts - 1:
                raise
            time.sleep(0.05)


def read_piece(path: str) -> pa.Table:
    import pyarrow.parquet as pq

    from kadapter.fs import filesystem_of

    fs, inner = filesystem_of(path)
    with fs.open(inner, "rb") as handle:
        table = pq.read_table(handle)
    fs.rm(inner)
    return table


def ray_batch_results(files: list, config: Any, seed: int,
                      pieces_dir: str) -> Iterator[tuple[list, Any]]:
    """Yield (batch, ``deps.BatchResult``) in input order: the batches of the local engine
    (``deps.line_batches``, as byte ranges) parsed by Ray Data ``map_batches`` over an
    actor pool of ``workers`` parsers."""
    import orjson
    import ray.data

    from kadapter import deps
    from kadapter.fs import filesystem_of

    batches = [{"index": index, "segments": orjson.dumps([tuple(s) for s in segments])}
               for index, segments in enumerate(deps.line_batches(files, config.batch_size))]
    fs, inner = filesystem_of(pieces_dir)
    fs.makedirs(inner, exist_ok=True)
    with ray_session(config.ray_address, config.workers):
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # results in input order
        context.enable_progress_bars = False
        options = {"num_gpus": config.gpus_per_parser} if config.gpus_per_parser else {}
        # A block is one Ray task (tens of ms of scheduling each): a few batches per block,
        # still at least BLOCKS_PER_PARSER blocks per parser to balance the load.
        per_block = max(1, min(MAX_BATCHES_PER_BLOCK,
                               len(batches) // (BLOCKS_PER_PARSER * config.workers)))
        dataset = ray.data.from_items(batches, override_num_blocks=-(-len(batches) // per_block))
        parsed = dataset.map_batches(
            _BatchParser, fn_constructor_args=(files, config, seed, str(pieces_dir)),
            batch_size=1, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=config.workers), **options)
        empty = deps.SCHEMA.empty_table()
        rows = iter(parsed.iter_rows())  # a generator: closing it stops the pipeline
        try:
            for row in rows:
                batch = [deps.Line(file, number, "", skip)
                         for file, number, skip in orjson.loads(row["lines"])]
                tables = {split: read_piece(row[split]) if row[split] else empty
                          for split in deps.SPLITS}
                yield batch, deps.BatchResult([tuple(o) for o in orjson.loads(row["outcomes"])],
                                              tables)
        finally:  # done, an early stop (max_sentences) or an error: stop the parsers
            rows.close()
            remove_pieces(fs, inner)
