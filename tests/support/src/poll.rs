//! Waiting with a bound instead of sleeping: a condition is checked every [`INTERVAL`] until
//! it holds, and the test fails (naming what it waited for) when the bound passes first.

use std::future::Future;
use std::time::{Duration, Instant};

/// How long to wait between checks.
pub const INTERVAL: Duration = Duration::from_millis(50);

/// Calls `check` until it returns `Some`, at most `bound`; panics naming `what` otherwise.
/// For tests without a runtime (the thread sleeps between checks).
pub fn blocking<T>(what: &str, bound: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {bound:?} waiting for {what}");
        std::thread::sleep(INTERVAL);
    }
}

/// Awaits `check` until it returns `Some`, at most `bound`; panics naming `what` otherwise.
pub async fn eventually<T, F, Fut>(what: &str, bound: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_explained(what, bound, String::new, check).await
}

/// Awaits `check` until it holds, at most `bound`; panics naming `what` otherwise.
pub async fn until<F, Fut>(what: &str, bound: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually(what, bound, || {
        let held = check();
        async move { held.await.then_some(()) }
    })
    .await
}

/// [`until`], and on timeout the panic message ends with `explain()` (a process's log, say).
pub async fn until_explained<F, Fut>(what: &str, bound: Duration, explain: impl FnOnce() -> String, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_explained(what, bound, explain, || {
        let held = check();
        async move { held.await.then_some(()) }
    })
    .await
}

/// [`eventually`], and on timeout the panic message ends with `explain()`.
pub async fn eventually_explained<T, F, Fut>(
    what: &str,
    bound: Duration,
    explain: impl FnOnce() -> String,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + bound;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() >= deadline {
            let context = explain();
            let sep = if context.is_empty() { "" } else { "\n" };
            panic!("timed out after {bound:?} waiting for {what}{sep}{context}");
        }
        tokio::time::sleep(INTERVAL).await;
    }
}

/// Awaits `get` until `done` holds for its value, at most `bound`, and returns the last value
/// either way: for a test that asserts on the value itself, with a better message than a
/// timeout.
pub async fn settle<T, F, Fut>(bound: Duration, mut get: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let deadline = Instant::now() + bound;
    loop {
        let v = get().await;
        if done(&v) || Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_returns_the_first_value() {
        let mut n = 0;
        let v = blocking("n to reach 3", Duration::from_secs(5), || {
            n += 1;
            (n == 3).then_some(n)
        });
        assert_eq!(v, 3);
    }

    #[test]
    #[should_panic(expected = "timed out after 100ms waiting for nothing")]
    fn blocking_fails_after_the_bound() {
        blocking::<()>("nothing", Duration::from_millis(100), || None);
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for the log\n--- log ---")]
    async fn until_explained_names_what_and_why() {
        until_explained("the log", Duration::from_millis(100), || "--- log ---".into(), || async { false }).await;
    }

    #[tokio::test]
    async fn settle_returns_the_last_value_after_the_bound() {
        let v = settle(Duration::from_millis(100), || async { 7 }, |v| *v == 8).await;
        assert_eq!(v, 7);
    }
}
