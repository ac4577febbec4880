"""The instance index: one Parquet row per kept instance, the contract between ``prepare`` and later stages.

``<prepare.out_dir>/index.parquet`` holds the columns of :data:`SCHEMA`, rows sorted by
``(split, image_id, ann_id)`` so that an image's instances are contiguous. Boxes are in image pixels of
the annotation orientation (the orientation :func:`picosam_pipeline.data.images.load_image` returns):

* ``bbox``           COCO ``[x, y, w, h]`` float64, clipped to the image when the JSON box was partly outside.
* ``roi_box``        PicoSAM3 ROI crop ``[x1, y1, x2, y2]`` int32, half-open, clipped (``crops.roi_box``).
* ``roi_float_box``  the unclipped float square it came from.
* ``point``          PicoSAM2 prompt ``[cx, cy]`` int32 (``crops.point_prompt``).
* ``point_box``      PicoSAM2 window ``[x1, y1, x2, y2]`` int32 (``crops.point_box``).
* ``rle_counts``     compressed COCO RLE (pycocotools string) of the full-image mask, size ``(height, width)``;
                     :func:`decode_mask` turns it back into an ``(H, W)`` uint8 {0, 1} array.

File-level metadata (dataset format and version per split, source files, prepare params) is JSON under
the schema metadata key :data:`METADATA_KEY`.

Reader API for later stages: :func:`read_index` (a ``pyarrow.Table``, optionally one split),
:func:`read_index_metadata`, :func:`iter_images` (one :class:`ImageGroup` per image, for stages that decode each
image once), :func:`stream_images` (the same for a whole split, read in batches), :func:`column_array` (a box
column as an ``(N, 4)`` array), :func:`decode_mask` and :func:`decode_mask_window`.
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

from picosam_pipeline.errors import PipelineError

INDEX_FILE = "index.parquet"
METADATA_KEY = b"picosam.index"
SORT_KEYS = [("split", "ascending"), ("image_id", "ascending"), ("ann_id", "ascending")]
ROW_GROUP_ROWS = 65_536

SCHEMA = pa.schema(
    [
        ("ann_id", pa.int64()),
        ("image_id", pa.int64()),
        ("split", pa.string()),
        ("file_name", pa.string()),
        ("image_path", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("category_id", pa.int32()),
        ("category_name", pa.string()),
        ("iscrowd", pa.bool_()),
        ("bbox", pa.list_(pa.float64(), 4)),
        ("area", pa.float64()),
        ("roi_box", pa.list_(pa.int32(), 4)),
        ("roi_float_box", pa.list_(pa.float64(), 4)),
        ("point", pa.list_(pa.int32(), 2)),
        ("point_box", pa.list_(pa.int32(), 4)),
        ("rle_counts", pa.string()),
    ]
)


class IndexBuilder:
    """Collects index rows, in any order, and writes the index file sorted by :data:`SORT_KEYS`.

    Every ``batch_rows`` rows become an Arrow record batch appended to ``spill`` (an Arrow IPC file), so memory
    holds one batch and the rows' sort keys (24 bytes a row), not the index: at 900k instances (``bench/scale.py``'s
    dataset) the index is 420 MB in memory, twice that while being sorted. :meth:`write` then sorts the keys and
    writes each row group of the file from the batches that hold its rows: one or two when the rows came nearly in
    order (prepare adds them image by image in image id order), every batch otherwise (correct, slower). The file
    written does not depend on ``batch_rows`` and is the one :func:`write_index` writes for the same rows.
    """

    def __init__(self, spill: str | Path, batch_rows: int = ROW_GROUP_ROWS) -> None:
        self.spill, self.batch_rows = Path(spill), batch_rows
        self._columns: dict[str, list] = {name: [] for name in SCHEMA.names}
        self._splits: dict[str, int] = {}  # split name -> its code in _keys
        self._keys = {name: array("q") for name in ("split", "image_id", "ann_id")}
        self._writer: pa.ipc.RecordBatchFileWriter | None = None

    def add(self, **row: Any) -> None:
        """Append one row; every :data:`SCHEMA` column must be given (a missing one is a bug: KeyError)."""
        for name, values in self._columns.items():
            values.append(row[name])
        self._keys["split"].append(self._splits.setdefault(row["split"], len(self._splits)))
        self._keys["image_id"].append(row["image_id"])
        self._keys["ann_id"].append(row["ann_id"])
        if len(self._columns["ann_id"]) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if self._writer is None:
            self._writer = pa.ipc.new_file(str(self.spill), SCHEMA)
        self._writer.write_batch(pa.record_batch(self._columns, schema=SCHEMA))
        self._columns = {name: [] for name in SCHEMA.names}

    def __len__(self) -> int:
        return len(self._keys["ann_id"])

    def write(self, path: str | Path, metadata: dict[str, Any]) -> Path:
        """Write the index file (atomic, as :func:`write_index`) and delete the spill file."""
        if self._columns["ann_id"]:
            self._flush()
        if self._writer is None:  # no rows
            return _write_row_groups([pa.Table.from_batches([], schema=SCHEMA)], path, metadata)
        self._writer.close()
        # Split codes ranked by name: the file's order is (split, image_id, ann_id), each ascending (lexsort is
        # stable, as Arrow's sort is).
        rank = np.argsort(np.argsort(np.array(list(self._splits), dtype=object)))
        split = rank[np.frombuffer(self._keys["split"], np.int64)]
        order = np.lexsort(
            (np.frombuffer(self._keys["ann_id"], np.int64), np.frombuffer(self._keys["image_id"], np.int64), split)
        )
        with pa.OSFile(str(self.spill), "rb") as source:
            reader = pa.ipc.open_file(source)
            path = _write_row_groups(
                (
                    _gather(reader, rows, self.batch_rows)
                    for rows in np.array_split(order, range(ROW_GROUP_ROWS, len(order), ROW_GROUP_ROWS))
                ),
                path,
                metadata,
            )
        self.spill.unlink()
        return path


def _gather(reader: pa.ipc.RecordBatchFileReader, rows: np.ndarray, batch_rows: int) -> pa.Table:
    """Rows ``rows`` (positions in the order they were added) of the spilled batches, in that order."""
    batches = np.unique(rows // batch_rows)
    first_row = np.searchsorted(batches, rows // batch_rows) * batch_rows  # batches are full but the last
    table = pa.Table.from_batches([reader.get_batch(int(b)) for b in batches], schema=SCHEMA)
    return table.take(first_row + rows % batch_rows)


def write_index(table: pa.Table, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write ``table`` sorted by :data:`SORT_KEYS`, with JSON ``metadata``; atomic (readers never see half a file)."""
    table = table.cast(SCHEMA).sort_by(SORT_KEYS)
    return _write_row_groups([table], path, metadata)


def _write_row_groups(tables: Iterable[pa.Table], path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write ``tables`` (rows in file order) as the index file ``path`` with JSON ``metadata``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = SCHEMA.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True, default=str)})
    tmp = path.with_name(path.name + ".tmp")
    # Row groups of 64k rows: a stage streaming one split (stream_images) reads a row group's pages at a time.
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for table in tables:
            writer.write_table(table.replace_schema_metadata(schema.metadata), row_group_size=ROW_GROUP_ROWS)
    os.replace(tmp, path)
    return path


def read_index(path: str | Path, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read the index (optionally one split, optionally some columns), rows in ``(split, image_id, ann_id)`` order.

    Raises:
        PipelineError: the file is missing or not an index, or ``split`` is not one the index was built from.
    """
    path = Path(path)
    _check_index(path, split)
    filters = [("split", "=", split)] if split is not None else None
    table = pq.read_table(path, columns=columns, filters=filters)
    # The file is written sorted; re-sorting is cheap and keeps the order promise whatever the reader does.
    if all(key in table.column_names for key, _ in SORT_KEYS):
        table = table.sort_by(SORT_KEYS)
    return table


def _check_index(path: Path, split: str | None) -> None:
    """PipelineError unless ``path`` is an index with every column (and ``split``, when given)."""
    schema = _read_schema(path)
    missing = [n for n in SCHEMA.names if n not in schema.names]
    if missing:
        raise PipelineError(
            f"{path}: instance index lacks columns {missing} (written by an older prepare?); "
            "rerun `picosam-pipeline run-stage prepare`"
        )
    if split is not None:
        splits = list(_metadata(schema, path).get("splits", {}))
        if split not in splits:
            raise PipelineError(
                f"{path}: no split {split!r} in the instance index (it has {splits}); "
                "fix the split name or add the split to prepare.splits and rerun prepare"
            )


def read_index_metadata(path: str | Path) -> dict[str, Any]:
    """The index's file-level metadata: ``splits`` ({name: format, version, files, counts}) and ``prepare`` params."""
    path = Path(path)
    return _metadata(_read_schema(path), path)


@dataclass(frozen=True)
class ImageGroup:
    """The rows of one image, for stages that load each image once and process all its instances."""

    split: str
    image_id: int
    file_name: str
    image_path: str
    width: int
    height: int
    rows: pa.Table  # this image's rows, in ann_id order

    def __len__(self) -> int:
        return self.rows.num_rows


def iter_images(table: pa.Table) -> Iterator[ImageGroup]:
    """Yield one :class:`ImageGroup` per ``(split, image_id)``, in index order (zero-copy slices of ``table``)."""
    n = table.num_rows
    if n == 0:
        return
    order = pc.sort_indices(table, sort_keys=SORT_KEYS).to_numpy()
    if (order != np.arange(n)).any():  # read_index's tables are in order already: no copy of them
        table = table.take(order)
    splits = table["split"].combine_chunks()
    image_ids = table["image_id"].to_numpy()
    new_split = pc.not_equal(splits.slice(1), splits.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, (image_ids[1:] != image_ids[:-1]) | new_split])
    ends = np.r_[starts[1:], n]
    for start, end in zip(starts.tolist(), ends.tolist()):
        rows = table.slice(start, end - start)
        first = rows.slice(0, 1).to_pylist()[0]
        yield ImageGroup(
            first["split"],
            first["image_id"],
            first["file_name"],
            first["image_path"],
            first["width"],
            first["height"],
            rows,
        )


def stream_images(path: str | Path, split: str, columns: list[str], batch_rows: int = 8192) -> Iterator[ImageGroup]:
    """:func:`iter_images` of ``split``, read from the index file a batch of rows at a time.

    For stages that walk a whole split once (pack, the GT-mask teacher): memory holds a batch of ``columns``
    (plus the ones :class:`ImageGroup` needs), not the split, whose RLE strings and paths are most of the
    index's bytes (about 430 bytes a row: 390 MB per copy at COCO's 900k instances). Row groups whose
    statistics exclude ``split`` are not read. Relies on the order prepare writes (:data:`SORT_KEYS`), which a
    stage reading both ways can check against :func:`read_index`; images out of that order raise PipelineError.
    """
    path = Path(path)
    _check_index(path, split)
    wanted = list(
        dict.fromkeys(["ann_id", "image_id", "split", "file_name", "image_path", "width", "height", *columns])
    )
    parquet = pq.ParquetFile(path)
    split_column = parquet.schema_arrow.get_field_index("split")
    carry, last_image = None, None
    for i in range(parquet.num_row_groups):
        stats = parquet.metadata.row_group(i).column(split_column).statistics
        if stats is not None and stats.has_min_max and not stats.min <= split <= stats.max:
            continue
        for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[i], columns=wanted):
            rows = pa.Table.from_batches([batch])
            rows = rows.filter(pc.equal(rows["split"], split))
            if carry is not None:
                rows = pa.concat_tables([carry, rows])
            groups = list(iter_images(rows))
            carry = groups.pop().rows if groups else None  # the last image may go on in the next batch
            for group in groups:
                if last_image is not None and group.image_id <= last_image:
                    raise PipelineError(
                        f"{path}: rows of split {split!r} are not in image order (image "
                        f"{group.image_id} after {last_image}); rerun prepare, which writes them sorted"
                    )
                last_image = group.image_id
                yield group
    if carry is not None:
        yield from iter_images(carry)


def column_array(table: pa.Table, name: str) -> np.ndarray:
    """A fixed-size list column (``bbox``, ``roi_box``, ``point``, ...) as an ``(N, k)`` array of its dtype."""
    column = table[name].combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), column.type.list_size)


def decode_mask(rle_counts: str, height: int, width: int) -> np.ndarray:
    """Decode a compressed COCO RLE string (``rle_counts`` column) to an ``(height, width)`` uint8 {0, 1} mask."""
    return mask_utils.decode({"size": [int(height), int(width)], "counts": rle_counts.encode("ascii")})


def decode_mask_window(rle_counts: str, height: int, width: int, window: tuple[int, int, int, int]) -> np.ndarray:
    """``decode_mask(rle_counts, height, width)[y1:y2, x1:x2]`` for ``window`` = (x1, y1, x2, y2) inside the image,
    C-contiguous uint8 {0, 1}, decoding only the window's columns.

    pack and evaluate need each mask only inside its crop box; pycocotools decodes the whole image (0.17 ms for a
    640x480 COCO mask, against 0.05 ms here on coco-sample's masks; ``tests/data/test_index.py`` checks equality
    with pycocotools). COCO RLE runs go down the columns (Fortran order), so columns x1..x2 are one range of runs.
    """
    x1, y1, x2, y2 = (int(v) for v in window)
    if not (0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height):
        raise ValueError(f"window {window} is not inside the {width}x{height} image")
    counts = _rle_counts(rle_counts.encode("ascii"))
    ends = np.cumsum(counts)
    if len(counts) == 0 or ends[-1] != height * width:
        raise ValueError(f"RLE counts cover {int(ends[-1]) if len(counts) else 0} pixels, not {height}x{width}")
    starts = ends - counts
    lo, hi = x1 * height, x2 * height  # the window's columns, whole, in the flat column-major order
    first, last = np.searchsorted(ends, lo, "right"), np.searchsorted(starts, hi, "left")  # runs overlapping them
    lengths = np.minimum(ends[first:last], hi) - np.maximum(starts[first:last], lo)
    values = (np.arange(first, last) & 1).astype(np.uint8)  # runs alternate 0, 1, 0, ... from the first pixel
    columns = np.repeat(values, lengths).reshape(x2 - x1, height)
    return np.ascontiguousarray(columns[:, y1:y2].T)


def _rle_counts(data: bytes) -> np.ndarray:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``, vectorised), int64.

    Each count is written in 5-bit groups, lowest first, as the character ``48 + group`` (+32 while more groups
    follow); bit 0x10 of a count's last group is its sign. From the fourth count on, each is stored as the
    difference from the count two before it.
    """
    chars = np.frombuffer(data, np.uint8).astype(np.int64) - 48
    last = np.flatnonzero((chars & 0x20) == 0)  # the last character of each count
    if len(last) == 0:
        return np.zeros(0, np.int64)
    first = np.concatenate(([0], last[:-1] + 1))
    owner = np.repeat(np.arange(len(last)), last - first + 1)
    shift = 5 * (np.arange(len(chars)) - first[owner])
    counts = np.bincount(owner, weights=(chars & 0x1F) << shift, minlength=len(last)).astype(np.int64)  # exact: < 2**53
    negative = (chars[last] & 0x10) != 0
    counts[negative] -= np.int64(1) << (shift[last[negative]] + 5)
    counts[3::2] += np.cumsum(counts[1::2])[:-1][: len(counts[3::2])]
    counts[4::2] += np.cumsum(counts[2::2])[:-1][: len(counts[4::2])]
    return counts


def _read_schema(path: Path) -> pa.Schema:
    if not path.is_file():
        raise PipelineError(
            f"{path}: instance index not found; run `picosam-pipeline run-stage prepare` "
            "(or `dvc repro prepare`) first, or fix the index path in params.yaml"
        )
    try:
        return pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise PipelineError(
            f"{path}: not a readable Parquet file ({err}), so not the instance index prepare writes; "
            "point the param that names it (pack.index, teacher.index, evaluate.index, quantize.index) at "
            "prepare's index.parquet (prepare.out_dir), or, if it is that file and it is damaged, rerun "
            "prepare, which writes a new one"
        ) from None


def _metadata(schema: pa.Schema, path: Path) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise PipelineError(
            f"{path}: Parquet file without instance-index metadata, so not written by prepare; rerun prepare"
        )
    return json.loads(raw)
