//! Owns the fake container engine for unit tests: containers, images and a call log in
//! memory, behind the same trait the supervisor calls Podman through.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::runtime::{ContainerRuntime, RtFuture};
use crate::podman::{ContainerInfo, ContainerSpec, ContainerSummary, PodmanError};

#[derive(Debug, Clone)]
pub struct FakeContainer {
    pub id: String,
    pub spec: ContainerSpec,
    pub running: bool,
    pub exit_code: i32,
    pub started_at_nanos: i64,
}

#[derive(Debug, Default)]
pub struct FakeState {
    pub containers: BTreeMap<String, FakeContainer>,
    pub images: BTreeSet<String>,
    /// Every call, as `op target` (`create chute-web`, `start <id>`, ...).
    pub calls: Vec<String>,
    /// Starting a container of this image fails, as a missing executable does.
    pub refuse_start_of_image: Option<String>,
    /// Every container call fails as if Podman's socket were gone.
    pub unreachable: bool,
    next_id: u64,
}

/// A container engine in memory. Starts and stops take effect at once.
#[derive(Debug, Default)]
pub struct FakePodman {
    pub state: RefCell<FakeState>,
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn not_found(what: &str) -> PodmanError {
    PodmanError::NotFound {
        what: format!("container {what}"),
    }
}

impl FakePodman {
    pub fn with_image(image: &str) -> Self {
        let f = FakePodman::default();
        f.state.borrow_mut().images.insert(image.to_owned());
        f
    }

    /// The calls made since the last `take_calls`.
    pub fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut self.state.borrow_mut().calls)
    }

    /// The container named `name`, if any.
    pub fn by_name(&self, name: &str) -> Option<FakeContainer> {
        self.state
            .borrow()
            .containers
            .values()
            .find(|c| c.spec.name == name)
            .cloned()
    }

    fn find_id(&self, id_or_name: &str) -> Option<String> {
        let s = self.state.borrow();
        if s.containers.contains_key(id_or_name) {
            return Some(id_or_name.to_owned());
        }
        s.containers
            .values()
            .find(|c| c.spec.name == id_or_name)
            .map(|c| c.id.clone())
    }

    fn call(&self, op: &str, target: &str) {
        self.state.borrow_mut().calls.push(format!("{op} {target}"));
    }

    fn reachable(&self) -> Result<(), PodmanError> {
        if self.state.borrow().unreachable {
            return Err(PodmanError::Connect {
                socket: "/fake/podman.sock".into(),
                source: std::io::ErrorKind::ConnectionRefused.into(),
            });
        }
        Ok(())
    }

    fn with<T>(
        &self,
        op: &'static str,
        id: &str,
        f: impl FnOnce(&mut FakeContainer) -> Result<T, PodmanError>,
    ) -> Result<T, PodmanError> {
        self.call(op, id);
        self.reachable()?;
        let id = self.find_id(id).ok_or_else(|| not_found(id))?;
        let mut s = self.state.borrow_mut();
        let c = s.containers.get_mut(&id).ok_or_else(|| not_found(&id))?;
        f(c)
    }
}

impl ContainerRuntime for FakePodman {
    fn create<'a>(&'a self, spec: &'a ContainerSpec) -> RtFuture<'a, String> {
        Box::pin(async move {
            // Every call is a point where the agent can be interrupted, as with Podman.
            smol::future::yield_now().await;
            self.call("create", &spec.name);
            self.reachable()?;
            if self.find_id(&spec.name).is_some() {
                return Err(PodmanError::Api {
                    op: "create",
                    target: spec.name.clone(),
                    status: 500,
                    message: "the container name is already in use".into(),
                });
            }
            let mut s = self.state.borrow_mut();
            s.next_id += 1;
            let id = format!("{:064x}", s.next_id);
            s.containers.insert(
                id.clone(),
                FakeContainer {
                    id: id.clone(),
                    spec: spec.clone(),
                    running: false,
                    exit_code: 0,
                    started_at_nanos: 0,
                },
            );
            Ok(id)
        })
    }

    fn start<'a>(&'a self, id: &'a str) -> RtFuture<'a, ()> {
        Box::pin(async move {
            // Every call is a point where the agent can be interrupted, as with Podman.
            smol::future::yield_now().await;
            let refuse = self.state.borrow().refuse_start_of_image.clone();
            self.with("start", id, |c| {
                if refuse.as_deref() == Some(c.spec.image.as_str()) {
                    c.exit_code = 127;
                    return Err(PodmanError::Api {
                        op: "start",
                        target: c.id.clone(),
                        status: 500,
                        message: "executable file not found in $PATH".into(),
                    });
                }
                c.running = true;
                c.started_at_nanos = now_nanos();
                Ok(())
            })
        })
    }

    fn stop<'a>(&'a self, id: &'a str, timeout_secs: u32) -> RtFuture<'a, ()> {
        Box::pin(async move {
            // Every call is a point where the agent can be interrupted, as with Podman.
            smol::future::yield_now().await;
            self.call("stop-timeout", &timeout_secs.to_string());
            self.with("stop", id, |c| {
                c.running = false;
                c.exit_code = 0;
                Ok(())
            })
        })
    }

    fn restart<'a>(&'a self, id: &'a str, _timeout_secs: u32) -> RtFuture<'a, ()> {
        Box::pin(async move {
            // Every call is a point where the agent can be interrupted, as with Podman.
            smol::future::yield_now().await;
            self.with("restart", id, |c| {
                c.running = true;
                c.started_at_nanos = now_nanos();
                Ok(())
            })
        })
    }

    fn kill<'a>(&'a self, id: &'a str, _signal: &'a str) -> RtFuture<'a, ()> {
        Box::pin(async move {
            // Every call is a point where the agent can be interrupted, as with Podman.
            smol::future::yield_now().await;
            self.with("kill", id, |c| {
                c.running = false;
                c.exit_code = 137;
                Ok(())
            })
        })
    }

    fn remove<'a>(&'a self, id: &'a str, _force: bool) -> RtFuture<'a, ()> {
        Box::pin(async move {
            // Every call is a point where the agent can be interrupted, as with Podman.
            smol::future::yield_now().await;
            self.call("remove", id);
            self.reachable()?;
            let id = self.find_id(id).ok_or_else(|| not_found(id))?;
            self.state.borrow_mut().containers.remove(&id);
            Ok(())
        })
    }

    fn inspect<'a>(&'a self, id_or_name: &'a str) -> RtFuture<'a, ContainerInfo> {
        Box::pin(async move {
            // Every call is a point where the agent can be interrupted, as with Podman.
            smol::future::yield_now().await;
            self.reachable()?;
            let id = self
                .find_id(id_or_name)
                .ok_or_else(|| not_found(id_or_name))?;
            let s = self.state.borrow();
            let c = s.containers.get(&id).ok_or_else(|| not_found(&id))?;
            Ok(ContainerInfo {
                id: c.id.clone(),
                name: c.spec.name.clone(),
                running: c.running,
                status: if c.running { "running" } else { "exited" }.into(),
                // No real process: the agent then reads no cgroup.
                pid: 0,
                exit_code: c.exit_code,
                started_at_nanos: Some(c.started_at_nanos),
                labels: c.spec.labels.clone(),
                image: c.spec.image.clone(),
                ..ContainerInfo::default()
            })
        })
    }

    fn list<'a>(&'a self, label: &'a str) -> RtFuture<'a, Vec<ContainerSummary>> {
        Box::pin(async move {
            // Every call is a point where the agent can be interrupted, as with Podman.
            smol::future::yield_now().await;
            self.reachable()?;
            let (key, value) = label.split_once('=').unwrap_or((label, ""));
            Ok(self
                .state
                .borrow()
                .containers
                .values()
                .filter(|c| c.spec.labels.get(key).map(String::as_str) == Some(value))
                .map(|c| ContainerSummary {
                    id: c.id.clone(),
                    name: c.spec.name.clone(),
                    running: c.running,
                    state: if c.running { "running" } else { "exited" }.into(),
                    exit_code: c.exit_code,
                    pid: 0,
                    labels: c.spec.labels.clone(),
                })
                .collect())
        })
    }

    fn image_exists<'a>(&'a self, reference: &'a str) -> RtFuture<'a, bool> {
        Box::pin(async move {
            // Every call is a point where the agent can be interrupted, as with Podman.
            smol::future::yield_now().await;
            Ok(self.state.borrow().images.contains(reference))
        })
    }

    /// In the fake an image's id is its reference.
    fn image_id<'a>(&'a self, reference: &'a str) -> RtFuture<'a, String> {
        Box::pin(async move {
            if self.state.borrow().images.contains(reference) {
                Ok(reference.to_owned())
            } else {
                Err(PodmanError::NotFound {
                    what: format!("image {reference}"),
                })
            }
        })
    }

    fn image_load<'a>(&'a self, archive: &'a Path) -> RtFuture<'a, Vec<String>> {
        Box::pin(async move {
            // Every call is a point where the agent can be interrupted, as with Podman.
            smol::future::yield_now().await;
            self.call("load", &archive.display().to_string());
            Ok(Vec::new())
        })
    }

    fn image_pull<'a>(&'a self, reference: &'a str) -> RtFuture<'a, ()> {
        Box::pin(async move {
            // Every call is a point where the agent can be interrupted, as with Podman.
            smol::future::yield_now().await;
            self.call("pull", reference);
            Err(PodmanError::Pull {
                reference: reference.to_owned(),
                message: "no registry reachable".into(),
            })
        })
    }
}
