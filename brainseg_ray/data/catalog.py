"""Find the slices of a kaggle_3m-style tree: one record per slice file, on the driver, cheaply.

Layout (at any depth under the root, e.g. lgg-mri-segmentation/kaggle_3m/):

    <patient_id>/<patient_id>_<n>.tif         the slice (n parsed from the name, never name order)
    <patient_id>/<patient_id>_<n>_mask.tif    its mask (optional: unlabelled data has none)
    data.csv                                  clinical fields, one row per patient (optional)

Every slice file found becomes exactly one record. Records that are wrong before any pixel is read
(a mask without its image, a duplicate slice number, an unusable name, an unsafe archive member,
an unreadable archive) carry their error here; the ingest job then adds decode errors. So
`found = written + errors` holds by construction.
"""

from __future__ import annotations

import io
import posixpath
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace

from brainseg_ray.storage import Member, S3Options, Source, expand, open_source

SLICE_SUFFIXES = (".tif", ".tiff")
_SLICE_NAME = re.compile(r"^(?P<patient>.+)_(?P<index>\d+)(?P<mask>_mask)?$", re.IGNORECASE)
_PATIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MASK_POLICIES = ("auto", "required", "optional")


@dataclass(frozen=True)
class SliceRecord:
    """One slice file found. `error_code` is set when the catalog already knows it is unusable."""

    source: int  # index into Catalog.sources
    order: int  # position of its file in the source listing (archive streaming order)
    patient_id: str
    slice_index: int | None
    image_path: str | None  # path inside the source
    image_uri: str | None
    mask_path: str | None = None
    mask_uri: str | None = None
    error_code: str | None = None
    error: str | None = None

    @property
    def uri(self) -> str:
        """The file this record stands for: the image, or the mask when there is no image."""
        return self.image_uri or self.mask_uri or ""


@dataclass
class Catalog:
    sources: list[Source]
    records: list[SliceRecord]
    clinical: dict[str, dict] = field(default_factory=dict)  # patient_id -> data.csv fields
    clinical_types: dict = field(default_factory=dict)  # column -> pyarrow type, in data.csv order
    ignored_files: int = 0

    @property
    def found(self) -> int:
        return len(self.records)

    def good(self) -> list[SliceRecord]:
        return [r for r in self.records if r.error_code is None]

    def rejected(self) -> list[SliceRecord]:
        return [r for r in self.records if r.error_code is not None]


def _parse(member: Member) -> tuple[str, int, bool] | tuple[None, str, str]:
    """(patient_id, index, is_mask), or (None, code, reason)."""
    folder = posixpath.basename(posixpath.dirname(member.path))
    stem, _ = posixpath.splitext(posixpath.basename(member.path))
    if not folder:
        return None, "bad_layout", "slice file is not inside a patient folder"
    if not _PATIENT_NAME.match(folder):
        return None, "bad_patient_name", f"patient folder name {folder!r} is not usable (letters, digits, _ . - only)"
    match = _SLICE_NAME.match(stem)
    if not match:
        return None, "bad_slice_name", f"cannot parse a slice number from {posixpath.basename(member.path)!r}"
    if match["patient"] != folder:
        return None, "bad_slice_name", f"file name names patient {match['patient']!r} but lies in folder {folder!r}"
    return folder, int(match["index"]), bool(match["mask"])


def _read_clinical(source: Source, member: Member) -> tuple[dict[str, dict], dict]:
    """data.csv rows by patient and the pyarrow type of each column; nothing if it is unusable."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    [(_, data)] = list(source.read([member.path]))
    if isinstance(data, Exception) or not data:
        return {}, {}
    try:
        table = pacsv.read_csv(io.BytesIO(data))
    except pa.ArrowInvalid:
        return {}, {}
    if "Patient" not in table.column_names:
        return {}, {}
    types = {f.name: f.type for f in table.schema if f.name != "Patient"}
    return {str(r["Patient"]): {c: r[c] for c in types} for r in table.to_pylist()}, types


def _clinical_key(patient_id: str, keys: dict[str, dict]) -> str | None:
    """data.csv names patients without the scan date: TCGA_CS_4943 for TCGA_CS_4943_20000902."""
    if patient_id in keys:
        return patient_id
    parts = patient_id.split("_")
    for n in range(len(parts) - 1, 0, -1):
        key = "_".join(parts[:n])
        if key in keys:
            return key
    return None


def build_catalog(uri: str, s3: S3Options | None = None, masks: str = "auto") -> Catalog:
    """Catalog a folder, S3 prefix, archive, or a glob of archives.

    masks: 'required' makes a slice without a mask an error; 'optional' keeps it unlabelled;
    'auto' requires masks when any mask is present (a labelled data set with a gap is a defect,
    a data set without masks is for inference).
    """
    if masks not in MASK_POLICIES:
        raise ValueError(f"masks must be one of {MASK_POLICIES}, got {masks!r}")
    sources = [open_source(u, s3) for u in expand(uri, s3)]
    records: list[SliceRecord] = []
    clinical: dict[str, dict] = {}
    clinical_types: dict = {}
    ignored = 0
    # (patient_id, index) -> images and masks, across all sources: a duplicate is a duplicate anywhere.
    images: dict[tuple[str, int], list[tuple[int, int, Member]]] = defaultdict(list)
    mask_files: dict[tuple[str, int], list[tuple[int, int, Member]]] = defaultdict(list)

    for s, source in enumerate(sources):
        listing = source.list()
        for problem in listing.problems:
            records.append(SliceRecord(s, -1, "", None, None, problem.uri, error_code=problem.code, error=problem.reason))
        for order, member in enumerate(listing.members):
            name = posixpath.basename(member.path)
            if name.lower() == "data.csv":
                found, types = _read_clinical(source, member)
                clinical.update(found)
                for column, type_ in types.items():
                    clinical_types.setdefault(column, type_)
                continue
            if not name.lower().endswith(SLICE_SUFFIXES) or name.startswith("."):
                ignored += 1
                continue
            patient, index, is_mask = _parse(member)
            if patient is None:
                records.append(SliceRecord(s, order, "", None, member.path, member.uri, error_code=index, error=is_mask))
                continue
            (mask_files if is_mask else images)[(patient, index)].append((s, order, member))

    has_any_mask = bool(mask_files)
    require_masks = masks == "required" or (masks == "auto" and has_any_mask)
    for key in sorted(set(images) | set(mask_files), key=lambda k: (k[0], k[1])):
        patient, index = key
        found_images, found_masks = images.get(key, []), mask_files.get(key, [])
        if not found_images:
            for s, order, m in found_masks:
                records.append(SliceRecord(s, order, patient, index, None, None, m.path, m.uri,
                                           "orphan_mask", "mask without its image"))
            continue
        if len(found_images) > 1:
            names = ", ".join(m.uri for _, _, m in found_images)
            for s, order, m in found_images:
                records.append(SliceRecord(s, order, patient, index, m.path, m.uri, error_code="duplicate_index",
                                           error=f"slice number {index} of {patient} appears more than once: {names}"))
            continue
        s, order, image = found_images[0]
        record = SliceRecord(s, order, patient, index, image.path, image.uri)
        if len(found_masks) > 1:
            names = ", ".join(m.uri for _, _, m in found_masks)
            record = replace(record, error_code="duplicate_index", error=f"more than one mask for the slice: {names}")
        elif found_masks:
            ms, _, mask = found_masks[0]
            if ms != s:
                record = replace(record, error_code="orphan_mask", error=f"its mask {mask.uri} is in another source")
            else:
                record = replace(record, mask_path=mask.path, mask_uri=mask.uri)
        elif require_masks:
            record = replace(record, error_code="missing_mask", error="slice has no mask while the data set is labelled")
        records.append(record)

    records.sort(key=lambda r: (r.source, r.patient_id, r.slice_index if r.slice_index is not None else -1, r.uri))
    return Catalog(sources, records, clinical, clinical_types, ignored)


def clinical_for(catalog: Catalog, patient_id: str) -> dict:
    """data.csv fields of a patient, all columns present (None where unknown)."""
    key = _clinical_key(patient_id, catalog.clinical)
    fields = catalog.clinical.get(key, {}) if key else {}
    return {c: fields.get(c) for c in catalog.clinical_types}
