//! Owns a chute's bandwidth shaping as its actor applies it: rates from the manifest, applied
//! to the running container's veth, and kill-rather-than-run-unshaped.

use std::path::Path;

use tracing::{debug, warn};

use super::actor::Actor;

/// Why a running chute could not be shaped.
#[derive(Debug, thiserror::Error)]
pub enum ShapingError {
    #[error("the container has no network namespace to shape")]
    NoNetns,
    #[error(transparent)]
    Tc(#[from] tc_shaper::ShapeError),
}

impl Actor {
    pub(super) fn rates(&self) -> tc_shaper::ChuteRates {
        let v = self.view.borrow();
        tc_shaper::ChuteRates {
            down_bps: v.manifest.network.bandwidth_down_bps,
            up_bps: v.manifest.network.bandwidth_up_bps,
        }
    }

    pub(super) fn wants_shaping(&self) -> bool {
        let r = self.rates();
        r.down_bps.is_some() || r.up_bps.is_some()
    }

    /// Applies the manifest's rates to the running container's veth.
    pub(super) async fn apply_shaping(&mut self) -> Result<(), ShapingError> {
        let rates = self.rates();
        let Some(netns) = self.view.borrow().sandbox_key.clone() else {
            return Err(ShapingError::NoNetns);
        };
        let shaping = tc_shaper::shape_chute(Path::new(&netns), rates).await?;
        debug!(chute = %self.name, host_if = %shaping.host_ifname, "shaped");
        self.view.borrow_mut().shaping = Some(shaping);
        Ok(())
    }

    /// A chute that cannot be shaped must not run unshaped: kill it and let its restart
    /// policy (with backoff) try again.
    pub(super) async fn shape_or_kill(&mut self) {
        if let Err(e) = self.apply_shaping().await {
            warn!(chute = %self.name, error = %e, "bandwidth shaping failed; stopping the chute");
            self.view.borrow_mut().last_error = Some(format!("bandwidth shaping failed: {e}"));
            if let Some(id) = self.container_id() {
                let _ = self.agent.runtime.kill(&id, "KILL").await;
            }
        }
    }
}
