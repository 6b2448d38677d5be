//! Owns deploy, update and rollback: admission and the install of a new chute, the live
//! bandwidth change, and the replace-or-restore of an update.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use chute_api::{DeployOutcome, Response};
use chutes::{ChuteState, Input, Lifecycle, Manifest};
use smol::channel::Sender;
use tracing::{info, warn};

use super::actor::{Actor, ChuteOp};
use super::images::ensure_image;
use super::registry::{Agent, ChuteView};
use super::{crash_point, short, wall_nanos, OpError};

impl Agent {
    /// Deploys a new chute or updates an existing one. Nothing is created or changed when
    /// this fails (an update that fails midway puts the previous version back).
    pub async fn deploy(
        self: &Rc<Self>,
        manifest_toml: String,
        dir: Option<PathBuf>,
        progress: Sender<String>,
    ) -> Result<Response, OpError> {
        let manifest = Manifest::from_toml_str(&manifest_toml)?;
        if manifest.network.host_network && !self.cfg.allow_host_network {
            return Err(OpError::HostNetworkRefused {
                chute: manifest.name.to_string(),
            });
        }
        // A chute whose caps Podman would silently drop is refused, naming the controller.
        crate::controllers::require(manifest.name.as_str(), self.cfg.cgroup_parent.as_deref())?;
        self.cfg.check_host_ports(&manifest)?;
        crate::imagepin::check_deploy(
            &self.state_dir,
            self.cfg.allow_unpinned_images,
            &manifest,
            dir.as_deref(),
        )
        .map_err(|message| OpError::Image {
            chute: manifest.name.to_string(),
            message,
        })?;
        let name = manifest.name.clone();
        let existing = self.chutes.borrow().get(&name).map(|h| h.tx.clone());
        if let Some(tx) = existing {
            let op = ChuteOp::Update {
                manifest: Box::new(manifest),
                manifest_toml,
                dir,
                progress,
            };
            return self.ask(tx, op, name.as_str()).await;
        }
        // Reserve first so two concurrent deploys cannot both fit into the same space;
        // the installer releases it again if anything fails.
        self.ledger
            .borrow_mut()
            .admit(name.clone(), manifest.reservation())?;
        let _ = progress.try_send(format!(
            "reserved {} cpu, {} memory, {} pids",
            chutes::format_cpu(u64::from(manifest.resources.cpu_millicores)),
            chutes::format_bytes(manifest.resources.memory_bytes),
            manifest.resources.pids
        ));
        let view = ChuteView::new(
            manifest.clone(),
            manifest_toml,
            ChuteState::Installing,
            true,
            None,
        );
        let lc = Lifecycle::new(manifest.restart, self.lifecycle_config());
        let tx = self.spawn_actor(view, lc);
        self.ask(tx, ChuteOp::Install { dir, progress }, name.as_str())
            .await
    }
}

impl Actor {
    pub(super) async fn install(
        &mut self,
        dir: Option<&Path>,
        progress: &Sender<String>,
    ) -> Result<Response, OpError> {
        let mut result = self.install_inner(dir, progress).await;
        if result.is_ok() {
            // Durable before acknowledged: if the running chute cannot be recorded, the
            // deploy is undone rather than left running outside any record.
            if let Err(e) = self.persist() {
                result = Err(e);
            }
        }
        if let Err(e) = &result {
            // Leave nothing behind: no container, no reservation, no record.
            if let Some(id) = self.container_id() {
                let _ = self.agent.runtime.remove(&id, true).await;
            }
            self.agent.ledger.borrow_mut().release(&self.name);
            self.view.borrow_mut().reservation_held = false;
            self.lc.handle(
                Input::InstallFailed {
                    reason: e.to_string(),
                },
                self.agent.now_ms(),
            );
            self.purge = true;
        }
        result
    }

    pub(super) async fn install_inner(
        &mut self,
        dir: Option<&Path>,
        progress: &Sender<String>,
    ) -> Result<Response, OpError> {
        let manifest = self.view.borrow().manifest.clone();
        ensure_image(&*self.agent.runtime, &manifest, dir, progress).await?;
        self.pin_image(&manifest, dir).await?;
        // Recorded (as installing) before anything is created: a crash from here on leaves
        // a record that reconciliation undoes, never a container nobody counts.
        self.persist()?;
        crash_point("deploy-recorded");
        let _ = progress.try_send(format!(
            "creating container {}",
            manifest.name.container_name()
        ));
        let id = self.create_container().await?;
        crash_point("deploy-after-create");
        let _ = progress.try_send(format!("starting container {}", short(&id)));
        let asked_at = wall_nanos();
        self.agent
            .runtime
            .start(&id)
            .await
            .map_err(|e| self.podman_err(e))?;
        crash_point("deploy-after-start");
        self.started_by_us(asked_at, None).await;
        self.feed(Input::Installed).await;
        if self.lc.state() != ChuteState::Running {
            return Err(OpError::ExitedAtStart {
                chute: self.name.to_string(),
                exit_code: self.lc.last_exit_code(),
            });
        }
        info!(chute = %self.name, container = %short(&id), "installed");
        Ok(self.deployed(DeployOutcome::Deployed))
    }

    /// True when `new` differs from the running manifest only in bandwidth (and version),
    /// which can be changed on the live qdiscs without touching the container.
    pub(super) fn only_rates_differ(&self, new: &Manifest) -> bool {
        let v = self.view.borrow();
        if self.lc.state() != ChuteState::Running || !v.reservation_held {
            return false;
        }
        let mut same = new.clone();
        same.network.bandwidth_down_bps = v.manifest.network.bandwidth_down_bps;
        same.network.bandwidth_up_bps = v.manifest.network.bandwidth_up_bps;
        same.version = v.manifest.version.clone();
        same == v.manifest
    }

    /// Changes a running chute's rates in place: growth checked first, the class changed
    /// live (no flush, no restart), the reservation resized only once the kernel took it.
    pub(super) async fn update_rates_live(
        &mut self,
        manifest: Manifest,
        manifest_toml: String,
        progress: &Sender<String>,
    ) -> Result<Response, OpError> {
        let want = manifest.reservation();
        self.agent.ledger.borrow().check_resize(&self.name, &want)?;
        let _ = progress.try_send("changing bandwidth on the live chute".into());
        let old_manifest =
            std::mem::replace(&mut self.view.borrow_mut().manifest, manifest.clone());
        let old_toml = std::mem::replace(
            &mut self.view.borrow_mut().manifest_toml,
            manifest_toml.clone(),
        );
        // The new rates are recorded before the kernel gets them: a crash in between is
        // finished by reconciliation, which shapes an adopted chute from its record.
        if let Err(e) = self.persist() {
            let mut v = self.view.borrow_mut();
            v.manifest = old_manifest;
            v.manifest_toml = old_toml;
            return Err(e);
        }
        if let Err(e) = self.apply_shaping().await {
            {
                let mut v = self.view.borrow_mut();
                v.manifest = old_manifest;
                v.manifest_toml = old_toml;
            }
            // Put the old rates back; the tc layer already removed what it half-built.
            let _ = self.apply_shaping().await;
            let _ = self.persist();
            return Err(OpError::Bandwidth {
                chute: self.name.to_string(),
                source: e,
            });
        }
        self.agent.ledger.borrow_mut().resize(&self.name, want)?;
        info!(chute = %self.name, version = %manifest.version, "bandwidth changed live");
        Ok(self.deployed(DeployOutcome::Updated { live: true }))
    }

    /// Replaces the chute's container with one built from `manifest`. Growth is checked
    /// before anything is touched; if the new container cannot start, the old version
    /// comes back with its old reservation.
    pub(super) async fn update(
        &mut self,
        manifest: Manifest,
        manifest_toml: String,
        dir: Option<&Path>,
        progress: &Sender<String>,
    ) -> Result<Response, OpError> {
        if self.view.borrow().manifest_toml == manifest_toml {
            return Ok(self.deployed(DeployOutcome::Unchanged));
        }
        if matches!(self.lc.state(), ChuteState::Installing | ChuteState::Dead) {
            return Err(OpError::Busy {
                chute: self.name.to_string(),
            });
        }
        if self.only_rates_differ(&manifest) {
            return self
                .update_rates_live(manifest, manifest_toml, progress)
                .await;
        }
        let want = manifest.reservation();
        let held = self.view.borrow().reservation_held;
        if held {
            self.agent.ledger.borrow().check_resize(&self.name, &want)?;
        } else {
            self.agent.ledger.borrow().check_admit(&self.name, &want)?;
        }
        ensure_image(&*self.agent.runtime, &manifest, dir, progress).await?;
        self.pin_image(&manifest, dir).await?;

        let old_manifest = self.view.borrow().manifest.clone();
        let old_toml = self.view.borrow().manifest_toml.clone();
        let old_held = held;
        let was_running = matches!(
            self.lc.state(),
            ChuteState::Running | ChuteState::Restarting
        );
        // Recorded before the old container is touched: the new manifest, and a state that
        // makes reconciliation start it, whatever the policy (an update starts the new
        // version, as below).
        // Interrupted anywhere below, the chute ends running: a container of the old
        // version is replaced by one of the new (reconciliation compares the manifest in
        // its labels), a missing one re-created, a stopped one started.
        {
            let mut v = self.view.borrow_mut();
            v.manifest = manifest.clone();
            v.manifest_toml = manifest_toml.clone();
        }
        self.pin = Some(ChuteState::Restarting);
        if let Err(e) = self.persist() {
            self.pin = None;
            let mut v = self.view.borrow_mut();
            v.manifest = old_manifest;
            v.manifest_toml = old_toml;
            drop(v);
            self.publish();
            return Err(e);
        }
        crash_point("update-recorded");
        let old_reservation = if held {
            Some(self.agent.ledger.borrow_mut().resize(&self.name, want)?)
        } else {
            self.agent
                .ledger
                .borrow_mut()
                .admit(self.name.clone(), want)?;
            None
        };
        self.view.borrow_mut().reservation_held = true;

        let _ = progress.try_send("stopping the running version".into());
        if was_running {
            self.feed(Input::StopRequested).await;
            // A failed stop is not waited out: the forced removal below ends the old run.
            if self.failed_op.take().is_none() {
                let _ = self
                    .wait_for("stopped", |a| a.lc.state() == ChuteState::Stopped)
                    .await;
            }
        }
        crash_point("update-after-stop");
        if let Some(id) = self.container_id() {
            let _ = self.agent.runtime.remove(&id, true).await;
        }
        crash_point("update-after-remove");
        {
            let mut v = self.view.borrow_mut();
            v.container_id = None;
            v.last_error = None;
        }
        self.lc.set_policy(manifest.restart);
        let _ = progress.try_send(format!("starting version {}", manifest.version));
        let before = self.runs.starts_seen();
        self.feed(Input::StartRequested).await;
        let mut started = self
            .wait_for("running", |a| {
                (a.runs.starts_seen() > before && a.lc.state() == ChuteState::Running)
                    // Podman refusing the start (no such executable, bad image config)
                    // fails the same way on every try: waiting out a backoff series
                    // would only delay the rollback.
                    || a.view.borrow().last_error.is_some()
            })
            .await;
        if started.is_ok() && self.lc.state() != ChuteState::Running {
            let why = self.view.borrow().last_error.clone().unwrap_or_default();
            started = Err(OpError::NotStarted {
                chute: self.name.to_string(),
                version: manifest.version.clone(),
                why,
            });
        }
        if let Err(e) = started {
            let message = e.to_string();
            warn!(chute = %self.name, error = %message, "update failed; restoring previous version");
            self.feed(Input::StopRequested).await;
            if let Some(id) = self.container_id() {
                let _ = self.agent.runtime.remove(&id, true).await;
            }
            {
                let mut v = self.view.borrow_mut();
                v.container_id = None;
                v.manifest = old_manifest.clone();
                v.manifest_toml = old_toml;
            }
            self.lc.set_policy(old_manifest.restart);
            {
                let mut ledger = self.agent.ledger.borrow_mut();
                ledger.release(&self.name);
                if let Some(old) = old_reservation {
                    ledger.force_insert(self.name.clone(), old);
                }
            }
            self.view.borrow_mut().reservation_held = old_held;
            // The old manifest is what must run now (if it ran before).
            self.pin = was_running.then_some(ChuteState::Restarting);
            let _ = self.persist();
            if was_running {
                let before = self.runs.starts_seen();
                self.feed(Input::StartRequested).await;
                let _ = self
                    .wait_for("running", |a| a.runs.starts_seen() > before)
                    .await;
            }
            self.pin = None;
            return Err(OpError::UpdateRolledBack {
                chute: self.name.to_string(),
                message,
            });
        }
        self.pin = None;
        info!(chute = %self.name, version = %manifest.version, "updated");
        Ok(self.deployed(DeployOutcome::Updated { live: false }))
    }
}
