//! Typed libpod client (placeholder).
