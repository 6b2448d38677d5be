//! Owns reconciliation at start-up: the snapshot and Podman's containers in, each chute's
//! task rebuilt (adopted, restarted, released, kept stopped or re-created) out.

use std::collections::BTreeMap;
use std::rc::Rc;

use chute_api::UnknownContainer;
use chutes::{ChuteName, ChuteState, Lifecycle, Manifest, ReconcileAction};
use smol::channel::{bounded, Sender};
use tracing::{debug, info, warn};

use super::actor::{ChuteMsg, ChuteOp, Happening};
use super::registry::{Agent, ChuteView};
use super::{short, ReconcileError, LABEL_CHUTE, LABEL_MANIFEST};
use crate::snapshot::{self, ChuteRecord};

impl Agent {
    /// Brings the in-memory state in line with the snapshot and what Podman reports.
    pub async fn reconcile(self: &Rc<Self>) -> Result<(), ReconcileError> {
        let loaded = snapshot::load_with_journal(&self.state_dir);
        if let Some(e) = &loaded.snapshot_error {
            let aside = snapshot::set_aside(&self.state_dir, snapshot::FILE_NAME);
            warn!(error = %e, set_aside = ?aside, from_journal = loaded.from_journal, "snapshot unusable");
        }
        if let Some(e) = &loaded.journal_error {
            let aside = snapshot::set_aside(&self.state_dir, snapshot::JOURNAL_NAME);
            warn!(error = %e, set_aside = ?aside, "journal unusable");
        }
        if loaded.from_journal {
            info!("state recovered from the journal copy");
        }
        let mut observed = self
            .runtime
            .list(&self.owned_filter())
            .await
            .map_err(ReconcileError::List)?;

        // When both copies are lost (corrupt, or deleted while our containers exist), the
        // labels are the record: every container we own carries the manifest it was
        // created from.
        let mut records = loaded.snapshot.map(|s| s.chutes).unwrap_or_default();
        let rebuilt = records.is_empty()
            && !loaded.from_journal
            && observed.iter().any(|c| c.labels.contains_key(LABEL_CHUTE));
        if rebuilt {
            warn!(
                containers = observed.len(),
                "no usable snapshot or journal; rebuilding from container labels"
            );
            for c in &observed {
                if let (Some(name), Some(toml)) =
                    (c.labels.get(LABEL_CHUTE), c.labels.get(LABEL_MANIFEST))
                {
                    if records.iter().any(|r| &r.name == name) {
                        continue;
                    }
                    records.push(ChuteRecord {
                        name: name.clone(),
                        manifest_toml: toml.clone(),
                        container_id: Some(c.id.clone()),
                        state: ChuteState::Running,
                        restarts: 0,
                        reservation_held: true,
                    });
                }
            }
        }

        // A container built from another manifest than the chute's record is a leftover
        // of an update interrupted after the record changed: replaced, so the chute runs
        // (or stays stopped) on the version it records. Bandwidth and version are left
        // out of the comparison: a live rate change keeps the container.
        let mut stale = Vec::new();
        observed.retain(|c| {
            let record = c
                .labels
                .get(LABEL_CHUTE)
                .and_then(|n| records.iter().find(|r| &r.name == n));
            let (Some(r), Some(label)) = (record, c.labels.get(LABEL_MANIFEST)) else {
                return true;
            };
            match (
                Manifest::from_toml_str(&r.manifest_toml),
                Manifest::from_toml_str(label),
            ) {
                (Ok(want), Ok(built)) if !same_container(&want, &built) => {
                    stale.push((r.name.clone(), c.id.clone()));
                    false
                }
                _ => true,
            }
        });
        for (chute, id) in stale {
            info!(chute = %chute, container = %short(&id), "container is of another version than the record; replacing it");
            if let Err(e) = self.runtime.remove(&id, true).await {
                warn!(chute = %chute, error = %e, "cannot remove the stale container");
            }
        }

        let mut manifests: BTreeMap<ChuteName, (Manifest, ChuteRecord)> = BTreeMap::new();
        for r in records {
            match Manifest::from_toml_str(&r.manifest_toml) {
                Ok(m) => {
                    manifests.insert(m.name.clone(), (m, r));
                }
                Err(e) => {
                    warn!(chute = %r.name, error = %e, "snapshot entry has an invalid manifest; skipping")
                }
            }
        }
        let known: Vec<chutes::KnownChute> = manifests
            .values()
            .map(|(m, r)| chutes::KnownChute {
                name: m.name.clone(),
                container_id: r.container_id.clone(),
                state: r.state,
                policy: m.restart,
            })
            .collect();
        let obs: Vec<chutes::ObservedContainer> = observed
            .iter()
            .map(|c| chutes::ObservedContainer {
                id: c.id.clone(),
                chute: c
                    .labels
                    .get(LABEL_CHUTE)
                    .and_then(|n| ChuteName::parse(n).ok()),
                running: c.running,
                exit_code: Some(c.exit_code),
            })
            .collect();
        let plan = chutes::reconcile::plan(&known, &obs);
        info!(
            actions = plan.len(),
            chutes = known.len(),
            containers = obs.len(),
            "reconciling"
        );
        for action in plan {
            self.apply_reconcile(action, &mut manifests).await;
        }
        let _ = self.save_snapshot();
        self.refresh_unknown().await;
        Ok(())
    }

    pub(super) async fn apply_reconcile(
        self: &Rc<Self>,
        action: ReconcileAction,
        manifests: &mut BTreeMap<ChuteName, (Manifest, ChuteRecord)>,
    ) {
        match action {
            ReconcileAction::Adopt {
                chute,
                container_id,
            } => {
                let Some((m, r)) = manifests.get(&chute) else {
                    return;
                };
                info!(chute = %chute, container = %short(&container_id), "adopting running chute");
                let tx = self.spawn_restored(restored_view(
                    m,
                    r,
                    ChuteState::Running,
                    true,
                    Some(container_id),
                ));
                let _ = tx.send(ChuteMsg::Happened(Happening::Resync)).await;
            }
            ReconcileAction::Restart {
                chute,
                container_id,
                exit_code,
            } => {
                let Some((m, r)) = manifests.get(&chute) else {
                    return;
                };
                info!(chute = %chute, ?exit_code, "chute died while the agent was down; restarting per policy {}", m.restart);
                let mut view = restored_view(m, r, ChuteState::Stopped, true, Some(container_id));
                view.last_exit_code = exit_code;
                // The start below is a restart: counted now, as the lifecycle would have.
                view.restarts = r.restarts.saturating_add(1);
                let tx = self.spawn_restored(view);
                start_in_background(&tx).await;
            }
            ReconcileAction::Release {
                chute,
                container_id,
                exit_code,
            } => {
                let Some((m, r)) = manifests.get(&chute) else {
                    return;
                };
                let state = if exit_code.unwrap_or(0) == 0 {
                    ChuteState::Stopped
                } else {
                    ChuteState::Failed
                };
                info!(chute = %chute, ?exit_code, "chute died while the agent was down; policy {} says no restart, reservation freed", m.restart);
                let mut view = restored_view(m, r, state, false, Some(container_id));
                view.last_exit_code = exit_code;
                self.spawn_restored(view);
            }
            ReconcileAction::KeepStopped {
                chute,
                container_id,
            } => self.keep_stopped(&chute, Some(container_id), manifests),
            ReconcileAction::Recreate { chute } => {
                let Some((m, r)) = manifests.get(&chute) else {
                    return;
                };
                warn!(chute = %chute, "container is gone; re-creating it");
                let tx = self.spawn_restored(restored_view(m, r, ChuteState::Stopped, true, None));
                start_in_background(&tx).await;
            }
            ReconcileAction::ReportUnknown {
                container_id,
                chute,
            } => {
                warn!(container = %short(&container_id), chute = ?chute.as_ref().map(|c| c.to_string()),
                    "container carries chuted labels but is not in the snapshot; leaving it alone (remove it with `podman rm` if it is stale)");
                self.unknown.borrow_mut().push(UnknownContainer {
                    container_id,
                    chute: chute.map(|c| c.to_string()),
                });
            }
            ReconcileAction::Forget { chute } => {
                debug!(chute = %chute, "forgetting chute with no container");
            }
            ReconcileAction::FinishRemoval {
                chute,
                container_id,
            } => {
                info!(chute = %chute, container = %short(&container_id), "finishing a removal, or undoing a deploy never acknowledged, interrupted by the agent stopping");
                if let Err(e) = self.runtime.remove(&container_id, true).await {
                    warn!(chute = %chute, error = %e, "cannot remove leftover container");
                }
            }
            ReconcileAction::RecreateStopped { chute } => {
                info!(chute = %chute, "stopped chute's container is gone; it will be re-created on the next start");
                self.keep_stopped(&chute, None, manifests);
            }
        }
        let over = self.ledger.borrow().overcommitted();
        if !over.is_empty() {
            warn!(?over, "adopted chutes exceed the configured pools; new deploys will be refused until space is freed");
        }
    }

    /// A chute the user stopped (or that failed) before the agent went down: it stays as it
    /// was, keeping its reservation if it held one; a missing container is re-created on
    /// the next start.
    pub(super) fn keep_stopped(
        self: &Rc<Self>,
        chute: &ChuteName,
        container_id: Option<String>,
        manifests: &BTreeMap<ChuteName, (Manifest, ChuteRecord)>,
    ) {
        let Some((m, r)) = manifests.get(chute) else {
            return;
        };
        self.spawn_restored(restored_view(
            m,
            r,
            r.state,
            r.reservation_held,
            container_id,
        ));
    }

    /// Gives a chute rebuilt by reconciliation its task: its reservation back in the ledger
    /// if the view says it holds one, its lifecycle in the view's state and restart count.
    pub(super) fn spawn_restored(self: &Rc<Self>, view: ChuteView) -> Sender<ChuteMsg> {
        if view.reservation_held {
            self.ledger
                .borrow_mut()
                .force_insert(view.manifest.name.clone(), view.manifest.reservation());
        }
        let lc = Lifecycle::restore(
            view.state,
            view.restarts,
            view.manifest.restart,
            self.lifecycle_config(),
        );
        self.spawn_actor(view, lc)
    }
}

/// Whether a container created from `built` serves a chute whose record says `want`:
/// equal but for bandwidth (changed live) and version.
fn same_container(want: &Manifest, built: &Manifest) -> bool {
    let mut b = built.clone();
    b.network.bandwidth_down_bps = want.network.bandwidth_down_bps;
    b.network.bandwidth_up_bps = want.network.bandwidth_up_bps;
    b.version = want.version.clone();
    &b == want
}

/// The view of a chute rebuilt from its snapshot record during reconciliation.
pub(super) fn restored_view(
    m: &Manifest,
    r: &ChuteRecord,
    state: ChuteState,
    held: bool,
    container_id: Option<String>,
) -> ChuteView {
    let mut view = ChuteView::new(
        m.clone(),
        r.manifest_toml.clone(),
        state,
        held,
        container_id,
    );
    view.restarts = r.restarts;
    view
}

/// Asks a freshly restored chute to start; nobody waits for the answer (its task logs and
/// records a failure).
pub(super) async fn start_in_background(tx: &Sender<ChuteMsg>) {
    let (reply, _rx) = bounded(1);
    let _ = tx
        .send(ChuteMsg::Request {
            op: ChuteOp::Start,
            reply,
        })
        .await;
}
