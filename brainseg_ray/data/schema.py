"""What a slice is in this project: its shape, channels and the columns of an ingested dataset."""

from __future__ import annotations

SCHEMA_VERSION = 1
IMAGE_SIZE = 256
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
MASK_SHAPE = (IMAGE_SIZE, IMAGE_SIZE)
CHANNEL_NAMES = ("pre-contrast", "FLAIR", "post-contrast")
FLAIR_CHANNEL = 1

# Layout of an ingested dataset under its output URI.
SLICES_DIR = "slices"  # Parquet fragments, one per ingest task
ERRORS_FILE = "errors.parquet"
MANIFEST_FILE = "manifest.json"
PROFILE_PNG = "profile.png"

# Columns of the slices table, besides the data.csv fields joined by patient.
SLICE_COLUMNS = (
    "patient_id",
    "slice_index",
    "image",  # uint8 [256,256,3]
    "mask",  # uint8 [256,256] in {0,1}; zeros when the slice is unlabelled
    "labelled",  # False when the source had no mask for the slice
    "has_tumor",  # null when unlabelled
    "tumor_pixels",  # null when unlabelled
    "resized",  # the source slice had another size and was resized
    "source_uri",
    "mask_uri",
)
ERROR_COLUMNS = ("file", "patient_id", "slice_index", "code", "reason")
