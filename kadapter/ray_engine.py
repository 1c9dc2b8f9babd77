"""``engine: ray`` for the data stages: the same per-file and per-batch functions as the
local engine (kadapter/trex.py, kadapter/deps.py), scheduled on a Ray cluster.

- T-REx: one Ray task per input file runs ``trex.scan_table``; its candidate table stays
  in Ray's object store (an Arrow block, no spill file). Entity mention counts and the
  distinct (relation, subject, object) pairs are summed by a tree of reduce tasks (fan-in
  ``FAN_IN``) and only the totals reach the driver; the entity filter and the
  label/split step run as one task per file again, and the driver writes the parts in
  input-file order, the same Parquet row groups as the local engine.
- Dependencies: Ray Data ``map_batches`` over an actor pool of parsers (``workers``
  actors; with stanza each takes ``deps_gpus_per_actor`` GPUs). Each actor parses,
  filters and splits its batches with ``deps.process_batch`` and writes its own Parquet
  pieces; the driver reads the input lines (to make the very batches of the local
  engine) and joins the pieces into train/dev.parquet in input order.

Failed tasks are retried by Ray (a killed worker process included); the results are
gathered in input order, so the bytes do not depend on scheduling.
"""

from __future__ import annotations

import contextlib
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from kadapter import trex
from kadapter.io import InputError

FAN_IN = 16  # tables merged by one reduce task
TASK_RETRIES = 3  # a task whose worker died is run again this many times


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
          on_error: str) -> tuple[trex.FileScan, pa.Table, pa.Table]:
    """``trex.scan_table`` for one file: (scan without its counter, candidates, counts)."""
    scan, table = trex.scan_table(path, seed, dev_fraction, exclude, on_error)
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

    def scan(self) -> tuple[Any, int]:
        import ray
        from tqdm import tqdm

        config = self.config
        exclude = frozenset(config.exclude_relations)
        task = _remote(_scan, num_returns=3)
        results = [task.remote(str(p), self.seed, config.dev_fraction, exclude, config.on_error)
                   for p in self.paths]
        stats, candidates = Counter(), 0
        self.count_refs = []
        try:
            for scan_ref, table_ref, counts_ref in tqdm(
                    results, desc="T-REx files", unit="file", disable=not self.progress):
                scan = ray.get(scan_ref)
                if scan.error:
                    raise InputError(*scan.error)
                stats.update(scan.stats)
                candidates += scan.candidates
                self.tables.append(table_ref)
                self.count_refs.append(counts_ref)
        except BaseException:
            for refs in results:
                ray.cancel(refs[0], force=True)
            raise
        return stats, candidates

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


class _Parser:
    """A parser actor: ``deps.process_batch`` on each batch, its tables written as
    Parquet pieces (by a temporary name, then renamed: a retried batch rewrites its
    pieces whole)."""

    def __init__(self, config: Any, seed: int, pieces_dir: str, worker: int):
        from kadapter import deps

        self.config, self.seed, self.pieces_dir = config, seed, pieces_dir
        self.parser = deps.make_parser(config, worker)

    def process(self, index: int, batch: list) -> tuple[list, dict[str, str]]:
        from kadapter import deps

        result = deps.process_batch(batch, self.parser, self.config, self.seed)
        pieces = {}
        for split, table in result.tables.items():
            if table.num_rows:
                pieces[split] = write_piece(table, f"{self.pieces_dir}/{index:09d}-{split}.parquet")
        return result.outcomes, pieces


def write_piece(table: pa.Table, path: str) -> str:
    import pyarrow.parquet as pq

    from kadapter.fs import filesystem_of

    fs, inner = filesystem_of(path)
    fs.makedirs(inner.rsplit("/", 1)[0], exist_ok=True)
    partial = f"{inner}.partial"
    with fs.open(partial, "wb") as handle:
        pq.write_table(table, handle, compression="zstd")
    fs.mv(partial, inner)
    return path


def read_piece(path: str) -> pa.Table:
    import pyarrow.parquet as pq

    from kadapter.fs import filesystem_of

    fs, inner = filesystem_of(path)
    with fs.open(inner, "rb") as handle:
        table = pq.read_table(handle)
    fs.rm(inner)
    return table


def ray_batch_results(batches: Iterator[list], config: Any, seed: int,
                      pieces_dir: str) -> Iterator[tuple[list, Any]]:
    """Yield (batch, ``deps.BatchResult``) in input order, the batches parsed by an actor
    pool of ``workers`` parsers, at most ``2 * workers`` batches ahead of the consumer."""
    import ray
    from ray.util import ActorPool

    from kadapter import deps
    from kadapter.fs import filesystem_of

    with ray_session(config.ray_address, config.workers):
        options = {"num_gpus": config.gpus_per_parser} if config.gpus_per_parser else {}
        actor = ray.remote(max_restarts=-1, max_task_retries=TASK_RETRIES, **options)(_Parser)
        parsers = [actor.remote(config, seed, str(pieces_dir), worker)
                   for worker in range(config.workers)]
        pool = ActorPool(parsers)
        pending: deque = deque()
        empty = deps.SCHEMA.empty_table()

        def next_result():
            batch = pending.popleft()
            outcomes, pieces = pool.get_next()
            tables = {split: read_piece(pieces[split]) if split in pieces else empty
                      for split in deps.SPLITS}
            return batch, deps.BatchResult(outcomes, tables)

        try:
            for index, batch in enumerate(batches):
                pool.submit(lambda parser, job: parser.process.remote(*job), (index, batch))
                pending.append(batch)
                if len(pending) >= 2 * config.workers:
                    yield next_result()
            while pending:
                yield next_result()
        finally:  # done, an early stop (max_sentences) or an error: stop the parsers
            for parser in parsers:
                ray.kill(parser)
            fs, inner = filesystem_of(pieces_dir)
            if fs.exists(inner):
                fs.rm(inner, recursive=True)
