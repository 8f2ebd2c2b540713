//! qcow2 images on two metadata backends: flush ordering and the qjournal.
