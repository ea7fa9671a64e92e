//! Demo stream (being written).
