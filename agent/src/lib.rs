pub mod egress;
pub mod hardening;
pub mod probe;
