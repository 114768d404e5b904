"""Dataset readers and the synthetic AVE generator."""
from .ave import (
    AVEAnnotation,
    AVEDataset,
    read_annotations,
    read_categories,
    read_h5_labels,
    read_order,
    segment_accuracy,
    segment_labels,
    segment_predictions,
    split_rows,
    video_labels,
    write_synthetic_ave,
)

__all__ = [
    "AVEAnnotation", "AVEDataset", "read_annotations", "read_categories", "read_h5_labels",
    "read_order", "segment_accuracy", "segment_labels", "segment_predictions", "split_rows",
    "video_labels", "write_synthetic_ave",
]

from .avvp import (  # noqa: E402  (issue 12: AVVP data)
    AVVP_CLASSES,
    AVVPAnnotations,
    AVVPDataset,
    read_avvp_annotations,
    write_synthetic_avvp,
)

__all__ += ["AVVP_CLASSES", "AVVPAnnotations", "AVVPDataset", "read_avvp_annotations",
            "write_synthetic_avvp"]
