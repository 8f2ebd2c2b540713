//! Crash-state exploration and loom models.
