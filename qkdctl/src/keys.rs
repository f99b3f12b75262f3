//! `qkdctl keys`: ETSI GS QKD 014 client (placeholder).
