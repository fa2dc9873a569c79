//! Pure policy engine.
