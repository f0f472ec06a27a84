//! verify (coming)
