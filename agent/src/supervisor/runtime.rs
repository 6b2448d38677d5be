//! Owns the seam in front of Podman: the container operations the supervisor calls, as a
//! trait. `Podman` (the libpod client) implements it; unit tests use a fake.
//!
//! Event and log streams stay on `Podman` itself: they are long-lived HTTP bodies the
//! supervisor only routes, and a test delivers events to a chute directly.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;

use crate::podman::{ContainerInfo, ContainerSpec, ContainerSummary, Podman, PodmanError};

/// A container operation in flight (boxed so the trait can be a `dyn`: one call per
/// operation, noise next to the HTTP exchange behind it).
pub type RtFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, PodmanError>> + 'a>>;

/// What the supervisor asks of the container engine.
pub trait ContainerRuntime {
    fn create<'a>(&'a self, spec: &'a ContainerSpec) -> RtFuture<'a, String>;
    fn start<'a>(&'a self, id: &'a str) -> RtFuture<'a, ()>;
    fn stop<'a>(&'a self, id: &'a str, timeout_secs: u32) -> RtFuture<'a, ()>;
    fn restart<'a>(&'a self, id: &'a str, timeout_secs: u32) -> RtFuture<'a, ()>;
    fn kill<'a>(&'a self, id: &'a str, signal: &'a str) -> RtFuture<'a, ()>;
    fn remove<'a>(&'a self, id: &'a str, force: bool) -> RtFuture<'a, ()>;
    fn inspect<'a>(&'a self, id_or_name: &'a str) -> RtFuture<'a, ContainerInfo>;
    /// Every container carrying `label` (`key=value`), running or not.
    fn list<'a>(&'a self, label: &'a str) -> RtFuture<'a, Vec<ContainerSummary>>;
    fn image_exists<'a>(&'a self, reference: &'a str) -> RtFuture<'a, bool>;
    /// The image id (sha256 hex) a reference resolves to.
    fn image_id<'a>(&'a self, reference: &'a str) -> RtFuture<'a, String>;
    /// Loads an archive; the names it held.
    fn image_load<'a>(&'a self, archive: &'a Path) -> RtFuture<'a, Vec<String>>;
    fn image_pull<'a>(&'a self, reference: &'a str) -> RtFuture<'a, ()>;
}

impl ContainerRuntime for Podman {
    fn create<'a>(&'a self, spec: &'a ContainerSpec) -> RtFuture<'a, String> {
        Box::pin(Podman::create(self, spec))
    }
    fn start<'a>(&'a self, id: &'a str) -> RtFuture<'a, ()> {
        Box::pin(Podman::start(self, id))
    }
    fn stop<'a>(&'a self, id: &'a str, timeout_secs: u32) -> RtFuture<'a, ()> {
        Box::pin(Podman::stop(self, id, timeout_secs))
    }
    fn restart<'a>(&'a self, id: &'a str, timeout_secs: u32) -> RtFuture<'a, ()> {
        Box::pin(Podman::restart(self, id, timeout_secs))
    }
    fn kill<'a>(&'a self, id: &'a str, signal: &'a str) -> RtFuture<'a, ()> {
        Box::pin(Podman::kill(self, id, signal))
    }
    fn remove<'a>(&'a self, id: &'a str, force: bool) -> RtFuture<'a, ()> {
        Box::pin(Podman::remove(self, id, force))
    }
    fn inspect<'a>(&'a self, id_or_name: &'a str) -> RtFuture<'a, ContainerInfo> {
        Box::pin(Podman::inspect(self, id_or_name))
    }
    fn list<'a>(&'a self, label: &'a str) -> RtFuture<'a, Vec<ContainerSummary>> {
        Box::pin(Podman::list(self, label))
    }
    fn image_exists<'a>(&'a self, reference: &'a str) -> RtFuture<'a, bool> {
        Box::pin(Podman::image_exists(self, reference))
    }
    fn image_id<'a>(&'a self, reference: &'a str) -> RtFuture<'a, String> {
        Box::pin(Podman::image_id(self, reference))
    }
    fn image_load<'a>(&'a self, archive: &'a Path) -> RtFuture<'a, Vec<String>> {
        Box::pin(Podman::image_load(self, archive))
    }
    fn image_pull<'a>(&'a self, reference: &'a str) -> RtFuture<'a, ()> {
        Box::pin(Podman::image_pull(self, reference))
    }
}
