"""``engine: ray`` for the data stages: the same per-file and per-batch functions as the
local engine (kadapter/trex.py, kadapter/deps.py), scheduled on a Ray cluster.

- T-REx: one Ray task per input file runs ``trex.scan_table``; its candidate table stays
  in Ray's object store (an Arrow block, no spill file). Entity mention counts and the
  distinct (relation, subject, object) pairs are summed by a tree of reduce tasks (fan-in
  ``FAN_IN``) and only the totals reach the driver; the entity filter and the
  label/split step run as one task per file again, and the driver writes the parts in
  input-file order, the same Parquet row groups as the local engine. (Ray Data's
  hash-shuffle groupby took 4-23 s per aggregation on a 2-CPU local Ray, more than the
  whole stage on 40 MB; the tree of tasks takes a fraction of a second.)
- Dependencies: the driver finds the local engine's batches as byte ranges of the input
  (``deps.line_batches``, counting newlines); Ray Data ``map_batches`` over an actor
  pool of ``workers`` parsers (with stanza each takes ``gpus_per_parser`` GPUs) reads,
  parses, filters and splits each batch (``deps.process_batch``) and writes its own
  Parquet pieces; the driver joins the pieces into train/dev.parquet in input order.
  Several batches go in one Ray Data block (one task): with one block per batch the
  scheduling left the parser idle ~12 ms between batches, ~11% of the time.

Failed tasks are retried by Ray (a killed worker process included); the results are
gathered in input order, so the bytes do not depend on scheduling.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from kadapter import trex
from kadapter.io import InputError

FAN_IN = 16  # tables merged by one reduce task
TASK_RETRIES = 3  # a task whose worker died is run again this many times
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


def _remote(function, **options):
    import ray

    return ray.remote(max_retries=TASK_RETRIES, retry_exceptions=False, **options)(function)


# --------------------------------------------------------------------------- T-REx


def _scan(path: str, seed: int, dev_fraction: float, exclude: frozenset[str],
          on_error: str, skip_docids: frozenset[str]) -> tuple[trex.FileScan, pa.Table, pa.Table]:
    """``trex.scan_table`` for one file: (scan without its counter, candidates, counts)."""
    scan, table = trex.scan_table(path, seed, dev_fraction, exclude, on_error, skip_docids)
    counts = pa.table({"entity": pa.array(list(scan.entity_counts), pa.string()),
                       "count": pa.array(list(scan.entity_counts.values()), pa.int64())})
    scan.entity_counts = None
    return scan, trex.SPILL_SCHEMA.empty_table() if table is None else table, counts


def _sum_counts(*tables: pa.Table) -> pa.Table:
    merged = pa.concat_tables(tables).group_by("entity").aggregate([("count", "sum")])
    return merged.rename_columns(["entity", "count"])


def _merge_pairs(*tables: pa.Table) -> pa.Table:
    return trex.distinct_pairs(pa.concat_tables(tables))


def _filter(table: pa.Table, kept_entities: pa.Array) -> tuple[pa.Table, pa.Table, int]:
    table = trex.entity_filter(table, kept_entities)
    return table, trex.distinct_pairs(table), table.num_rows


class RayTrex:
    """The T-REx stage's passes as Ray tasks (see ``trex.LocalTrex`` for the local ones)."""

    def __init__(self, paths: list, config: trex.TrexConfig, seed: int, progress: bool):
        self.paths, self.config, self.seed, self.progress = paths, config, seed, progress
        self.session = ray_session(config.ray_address, config.workers)
        self.session.__enter__()
        self.tables: list = []

    def _tree(self, merge, refs: list):
        """Reduce object refs of tables with ``merge`` in a tree of tasks; one table back."""
        import ray

        task = _remote(merge)
        while len(refs) > 1:
            refs = [task.remote(*refs[i:i + FAN_IN]) for i in range(0, len(refs), FAN_IN)]
        return ray.get(refs[0])

    def scan(self, skips: dict[int, frozenset[str]]) -> tuple[Any, int, list]:
        """Pass 1 as one task per file (see ``trex.LocalTrex.scan``)."""
        import ray

        from kadapter.progress import progress as progress_bar

        config = self.config
        exclude = frozenset(config.exclude_relations)
        task = _remote(_scan, num_returns=3)
        results = [task.remote(str(p), self.seed, config.dev_fraction, exclude, config.on_error,
                               skips.get(i, frozenset()))
                   for i, p in enumerate(self.paths)]
        stats, candidates, docids = Counter(), 0, []
        self.tables, self.count_refs = [], []
        try:
            for scan_ref, table_ref, counts_ref in progress_bar(
                    results, desc="T-REx files", unit="file", disable=not self.progress):
                scan = ray.get(scan_ref)
                if scan.error:
                    raise InputError(*scan.error)
                stats.update(scan.stats)
                candidates += scan.candidates
                docids.append(trex._docids_of(scan))
                self.tables.append(table_ref)
                self.count_refs.append(counts_ref)
        except BaseException:
            for refs in results:
                ray.cancel(refs[0], force=True)
            raise
        return stats, candidates, docids

    def entity_totals(self, min_count: int) -> tuple[int, int, pa.Array]:
        totals = self._tree(_sum_counts, self.count_refs)
        kept = totals.filter(pc.greater_equal(totals["count"], min_count))["entity"]
        kept = pc.take(kept, pc.sort_indices(kept)).combine_chunks()
        return pc.sum(totals["count"]).as_py() or 0, totals.num_rows, kept

    def filter_entities(self, kept_entities: pa.Array) -> tuple[int, dict[str, int]]:
        import ray

        kept_ref = ray.put(kept_entities)
        task = _remote(_filter, num_returns=3)
        results = [task.remote(table, kept_ref) for table in self.tables]
        self.tables = [table for table, _, _ in results]
        after_entity_filter = sum(ray.get([rows for _, _, rows in results]))
        pairs = self._tree(_merge_pairs, [pairs for _, pairs, _ in results])
        return after_entity_filter, trex.pair_counts_of([pairs])

    def labelled_parts(self, kept_relations: pa.Array) -> Iterator[list[tuple[str, pa.Table]]]:
        import ray

        kept_ref = ray.put(kept_relations)
        task = _remote(trex.label_and_split)
        results = [task.remote(table, kept_ref) for table in self.tables]
        for ref in results:  # in input-file order, whatever order they finish in
            yield ray.get(ref)

    def close(self) -> None:
        self.tables = self.count_refs = []
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
