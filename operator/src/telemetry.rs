//! Logging set-up shared by every subcommand.

/// Install a tracing subscriber: human-readable by default, JSON lines when `json`.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests) is harmless; ignore it.
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}
