//! One way to bound a future in time on the agent's executor.

use std::future::Future;
use std::time::Duration;

/// `f`'s output, or `None` once `limit` has passed (then `f` is dropped, which cancels it:
/// a socket it held is closed).
pub async fn with_timeout<T>(limit: Duration, f: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(f.await) }, async {
        smol::Timer::after(limit).await;
        None
    })
    .await
}
