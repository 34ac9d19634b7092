"""The paper's evaluations, runnable on any model and any dataset size.

* :mod:`~dinofeat.eval.knn`: weighted k-NN classification (:func:`knn_classify`,
  :func:`knn_accuracy`; ``dinofeat eval knn``);
* :mod:`~dinofeat.eval.linear`: linear probing and linear heads (``dinofeat eval linear``);
* :mod:`~dinofeat.eval.retrieval`: revisited Oxford/Paris (:func:`compute_map`;
  ``dinofeat eval retrieval``);
* :mod:`~dinofeat.eval.copydetect`: Copydays copy detection and PCA-whitening
  (:func:`learn_whitening`; ``dinofeat eval copydetect``);
* :mod:`~dinofeat.eval.davis`: DAVIS-2017 video object segmentation by label
  propagation, J and F (``dinofeat eval davis``).
"""

from .copydetect import Whitening, copy_detection_map, evaluate_copydetect, learn_whitening
from .davis import (boundary_f_measure, davis_palette, evaluate_davis, evaluate_sequence,
                    propagate_labels, region_jaccard, segment_video)
from .folders import LabeledImages, image_folder
from .knn import evaluate_knn, knn_accuracy, knn_classify
from .linear import (LinearClassifier, LinearProbe, LinearProbeConfig, attach_classifier,
                     evaluate_linear, linear_features, load_linear_head, train_linear_on_features,
                     train_linear_probe)
from .retrieval import (MapResult, RestrictedUnpickler, UnsafePickleError, average_precision,
                        compute_map, evaluate_retrieval, read_gnd, revisited_map)

__all__ = [
    "knn_classify", "knn_accuracy", "evaluate_knn",
    "LinearClassifier", "LinearProbe", "LinearProbeConfig", "linear_features",
    "attach_classifier",
    "train_linear_on_features", "train_linear_probe", "evaluate_linear", "load_linear_head",
    "compute_map", "average_precision", "revisited_map", "MapResult", "RestrictedUnpickler",
    "UnsafePickleError", "read_gnd", "evaluate_retrieval",
    "Whitening", "learn_whitening", "copy_detection_map", "evaluate_copydetect",
    "propagate_labels", "segment_video", "region_jaccard", "boundary_f_measure",
    "evaluate_sequence", "davis_palette", "evaluate_davis",
    "LabeledImages", "image_folder",
]
