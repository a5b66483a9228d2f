"""Architecture search over per-group widths (ACP)."""
