"""Face data: image I/O, Eq. 16 degradation, Parquet shards and the training dataset."""

from rlrestore.data.dataset import FaceDataset, collate_faces
from rlrestore.data.degradation import DegradationParams, degrade, degrade_seeded, sample_params
from rlrestore.data.embedded import embedded_faces_dir
from rlrestore.data.images import (
    ImageLoadError,
    decode_png,
    encode_png,
    image_grid,
    iter_image_files,
    load_image,
    save_image,
    square_resize,
    to_tensor,
    to_uint8,
)
from rlrestore.data.shards import (
    BuildReport,
    FaceRecord,
    ShardError,
    build_shards,
    read_shards,
    split_holdout,
)

__all__ = [
    "BuildReport",
    "DegradationParams",
    "FaceDataset",
    "FaceRecord",
    "ImageLoadError",
    "ShardError",
    "build_shards",
    "collate_faces",
    "decode_png",
    "degrade",
    "degrade_seeded",
    "embedded_faces_dir",
    "encode_png",
    "image_grid",
    "iter_image_files",
    "load_image",
    "read_shards",
    "sample_params",
    "save_image",
    "split_holdout",
    "square_resize",
    "to_tensor",
    "to_uint8",
]
