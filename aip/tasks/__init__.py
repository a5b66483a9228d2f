"""What differs between classification and detection: data, the task loss, the metric, report columns, default taps."""
