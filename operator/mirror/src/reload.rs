//! Configuration files the operator rewrites (policy, clients): parsed at start (a bad file
//! stops the mirror from starting), then re-read when their content changes. A bad edit
//! later is logged and the previous version stays in force: a typo must not open the mirror,
//! nor take it down.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// A value that a reload may replace; readers take a cheap snapshot.
pub struct Watched<T> {
    current: RwLock<Arc<T>>,
    generation: AtomicU64,
}

impl<T> Watched<T> {
    pub fn new(value: T) -> Self {
        Self { current: RwLock::new(Arc::new(value)), generation: AtomicU64::new(1) }
    }

    pub fn get(&self) -> Arc<T> {
        self.current.read().map(|c| c.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn set(&self, value: T) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct LoadError {
    pub path: String,
    pub message: String,
}

/// Read and parse `path` once.
pub fn load<T, E: std::fmt::Display>(
    path: &Path,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Result<(T, Vec<u8>), LoadError> {
    let err = |message: String| LoadError { path: path.display().to_string(), message };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| err(e.to_string()))?;
    let value = parse(text).map_err(|e| err(e.to_string()))?;
    Ok((value, bytes))
}

/// Poll `path` every `interval`; when its bytes change and parse, replace the value and call
/// `changed`. Comparing content (not mtime) also catches Kubernetes' atomic ConfigMap swaps.
pub fn watch<T, E, P, C>(
    path: PathBuf,
    initial: Vec<u8>,
    target: Arc<Watched<T>>,
    interval: Duration,
    parse: P,
    changed: C,
) where
    T: Send + Sync + 'static,
    E: std::fmt::Display,
    P: Fn(&str) -> Result<T, E> + Send + 'static,
    C: Fn(&T) + Send + 'static,
{
    tokio::spawn(async move {
        let mut last = initial;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Ok(bytes) = tokio::fs::read(&path).await else {
                tracing::warn!(path = %path.display(), "cannot read; keeping the previous version");
                continue;
            };
            if bytes == last {
                continue;
            }
            match std::str::from_utf8(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|t| parse(t).map_err(|e| e.to_string()))
            {
                Ok(value) => {
                    tracing::info!(path = %path.display(), "reloaded");
                    changed(&value);
                    target.set(value);
                }
                Err(e) => tracing::error!(path = %path.display(), error = %e, "invalid; keeping the previous version"),
            }
            last = bytes;
        }
    });
}
