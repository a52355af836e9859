"""The few Ray Data calls whose form changed within the supported Ray range (pyproject.toml).

The oldest supported Ray is the one PAI's own Ray image ships (2.39); everything else sftprep
uses from Ray Data (``Datasource``, ``iter_internal_ref_bundles``, ``ActorPoolStrategy``, the
``DataContext`` fields) has the same form from there to the newest. ``.ci/run`` runs the
Ray-facing tests on the oldest; the main suite runs on the newest.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import sys

import ray
from ray.data.block import BlockMetadata

# Until Ray 2.4x a block's schema was part of its metadata; since then ReadTask takes it.
_SCHEMA_IN_METADATA = "schema" in BlockMetadata.__dataclass_fields__
# 2.39 takes a read task's CPUs in ray_remote_args only, which the newest deprecate.
_READ_TAKES_NUM_CPUS = "num_cpus" in inspect.signature(ray.data.read_datasource).parameters


def read_datasource(datasource, num_cpus: float) -> ray.data.Dataset:
    """``ray.data.read_datasource`` with each read task claiming ``num_cpus``."""
    if _READ_TAKES_NUM_CPUS:
        return ray.data.read_datasource(datasource, num_cpus=num_cpus)
    return ray.data.read_datasource(datasource, ray_remote_args={"num_cpus": num_cpus})


def read_task(read, size_bytes: int, url: str, schema) -> ray.data.ReadTask:
    """A read task of unknown row count streaming ``size_bytes`` from ``url`` as ``schema``."""
    meta = dict(num_rows=None, size_bytes=size_bytes, input_files=[url], exec_stats=None)
    if _SCHEMA_IN_METADATA:
        return ray.data.ReadTask(read, BlockMetadata(schema=schema, **meta))
    return ray.data.ReadTask(read, BlockMetadata(**meta), schema=schema)


def with_object_store_limit(limits, object_store_bytes: int):
    """A copy of the ``ExecutionResources`` limits ``limits`` with the object store's set
    (``copy(**changes)`` arrived after 2.39)."""
    try:
        return limits.copy(object_store_memory=object_store_bytes)
    except TypeError:
        return ray.data.ExecutionResources.for_limits(cpu=limits.cpu, gpu=limits.gpu,
                                                      object_store_memory=object_store_bytes)


@contextlib.contextmanager
def data_context_copy():
    """Run with a copy of Ray Data's current ``DataContext`` as the current one, so the job's
    settings go on the copy; the one before is current again after (``DataContext.current``,
    which does this, arrived after 2.39)."""
    context = ray.data.DataContext
    if hasattr(context, "current"):
        with context.current(context.get_current().copy()):
            yield
        return
    before = context.get_current()
    context._set_current(copy.deepcopy(before))
    try:
        yield
    finally:
        context._set_current(before)


def progress_bars(wanted: bool) -> bool:
    """``DataContext.enable_progress_bars`` for ``wanted``: bars only on a terminal. Where
    stdout is not one, the newest Ray logs progress instead (to the ``ray.data`` logger, whose
    console output the build keeps to errors) and 2.39 would draw its bars into stderr."""
    return wanted and sys.stdout.isatty()
