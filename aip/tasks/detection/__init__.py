"""Object detection: data sets, detectors, their prunable view and the mAP evaluator."""
