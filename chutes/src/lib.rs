//! The pure model of a chute, shared by the `chuted` agent and the cloud tools.
//!
//! A *chute* is a third-party container that the agent runs under Podman with hard caps.
//! This crate holds every decision about a chute that can be made without touching the
//! machine:
//!
//! * [`manifest`]: parse `chute.toml` once into validated types ([`Manifest`]); unknown keys
//!   and bad values are refused with messages naming the key, the value and what is allowed.
//! * [`ledger`]: admission control from fixed device pools ([`Ledger`]): a chute runs only
//!   if all of its caps fit, operations are all-or-nothing, and growth is validated
//!   before anything is released.
//! * [`lifecycle`]: the per-chute state machine ([`Lifecycle`]): inputs (user requests,
//!   Podman events, fired timers) in, [`Action`]s out, with restart policy and backoff.
//! * [`reconcile`]: what to do with each chute when the agent starts again ([`plan`]).
//! * [`confirm`]: which of Podman's late `start`/`died` events only confirm what the agent
//!   already did ([`Confirmations`]).
//!
//! ```
//! use chutes::{Action, Amounts, Input, Ledger, Lifecycle, LifecycleConfig, Manifest};
//!
//! let m = Manifest::from_toml_str(
//!     "name = \"web\"\nversion = \"1\"\nimage = \"localhost/web:1\"\n\
//!      [resources]\ncpu = 0.5\nmemory = \"64MiB\"\n",
//! )?;
//! let mut ledger = Ledger::new(Amounts { cpu_millicores: 2000, memory_bytes: 256 << 20,
//!     pids: 4096, bandwidth_down_bps: 0, bandwidth_up_bps: 0 });
//! ledger.admit(m.name.clone(), m.reservation())?;
//!
//! let mut life = Lifecycle::new(m.restart, LifecycleConfig::default());
//! assert!(life.handle(Input::Installed, 0).is_empty());
//! // The container crashes: on-failure restarts it after the initial backoff.
//! let actions = life.handle(Input::ContainerExited { exit_code: 1 }, 500);
//! assert!(matches!(actions[..], [Action::SetTimer { after_ms: 1_000, .. }]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! What it deliberately is not: there is no I/O here, no clock, no Podman, no files and no
//! logging. Time comes in as `now_ms: u64`; timers are requested as actions and fed back
//! as inputs. Every data type is `Serialize + Deserialize + Clone + Debug + PartialEq` so
//! the agent can snapshot it with postcard and print it as JSON.

pub mod confirm;
pub mod ledger;
pub mod lifecycle;
pub mod manifest;
pub mod reconcile;

pub use confirm::{Confirmations, DiedEvent, StartEvent};
pub use ledger::{AdmissionError, Amounts, Ledger, Pools, Reservation, Resource, Shortfall};
pub use lifecycle::{
    Action, BackoffConfig, ChuteState, Input, Lifecycle, LifecycleConfig, LifecycleError,
};
pub use manifest::{
    format_bytes, format_cpu, format_rate, parse_bytes, parse_rate_bps, ChuteName, Manifest,
    ManifestError, Network, PortMapping, Protocol, Resources, RestartPolicy,
};
pub use reconcile::{plan, KnownChute, ObservedContainer, ReconcileAction};
