"""Object detection: what differs from classification, one job per module.

data.py        Record, DetectionSet, DetectionData and the data set registry; sources.py: pennfudan, voc, coco;
               synthetic.py: seeded coloured shapes; transforms.py: seeded box-aware augmentation, collate;
               datasets.py: build_detection_data(name, root, image_size, augment, seed, subset, **options),
               check_detection_data (the data.* keys a detection run refuses)
models.py      create_detector(name, num_classes, image_size, **kwargs): torchvision's detectors, tiny_ssd, pkg.mod:fn
prunable.py    PrunableDetector (a traceable view sharing the detector's modules) and head_layers (never pruned)
taps.py        detection_taps: the modules that make the feature levels (attention-transfer taps)
search.py      DetectionSearch, what ACP needs: fixed-epoch training images, a candidate's short-recovery loss,
               the view's inputs, mAP@.5 as the held-out score
metrics.py     evaluate_detector / mean_average_precision: mAP@[.5:.95] and mAP@.5 in percent
"""
