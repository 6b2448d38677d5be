//! Per-chute bandwidth shaping with HTB, configured over rtnetlink.
//!
//! A chute's download is shaped on the host side of its veth (egress toward the chute);
//! its upload inside the chute's network namespace on the chute side of the veth (egress
//! from the chute). The namespace is entered by file descriptor from a short-lived thread
//! that only creates the netlink socket there; nothing runs inside the container.
//!
//! Two halves: [`plan`] is pure (rates + what exists → minimal list of changes) and `nl`
//! talks netlink (raw `TCA_HTB_*`/`TCA_TBF_*` attributes, since netlink-packet-route has
//! no typed HTB/TBF). The async functions need no particular executor: each drives its own
//! netlink connection while it runs (the socket is registered with `async-io`); a call
//! costs one short-lived thread for the namespace switch and ~2 ms for a full setup.
//!
//! The tree per interface is HTB root `1:` (default class `1:1`), class `1:1` with
//! rate = ceil = the chute's rate, and by default a TBF leaf `10:` at the same rate: veths
//! do GSO, and without the leaf HTB is handed 64 KB super-packets and overshoots low
//! rates (measured +7% at 2 mbit); TBF cuts them into frames on enqueue.
//!
//! Deliberately not here: ingress policing, per-flow fairness inside a chute, filters
//! (all of a shaped interface's traffic belongs to one chute, so HTB's `default` class
//! does the classification), admission control (the agent's ledger decides rates), and
//! any use of the `tc` binary.

use std::future::Future;
use std::path::{Path, PathBuf};

use rtnetlink::Handle;

mod nl;
pub mod plan;

use plan::{Op, PlanError, Psched, Wanted};

/// Wanted rates of one chute, in bits per second of L2 traffic (what HTB counts:
/// Ethernet header + IP packet). `None`: that direction is not shaped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChuteRates {
    /// Toward the chute.
    pub down_bps: Option<u64>,
    /// From the chute.
    pub up_bps: Option<u64>,
}

/// Where a chute's shaping lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChuteShaping {
    /// Host side of the veth (download is shaped here), in the agent's namespace.
    pub host_ifname: String,
    /// Chute side of the veth (upload is shaped here), inside the chute's namespace.
    pub chute_ifname: String,
}

/// A transfer direction, seen from the chute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Down,
    Up,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Down => "download",
            Direction::Up => "upload",
        })
    }
}

/// Counters and configuration of one shaped direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectionStats {
    pub interface: String,
    /// Configured rate, bits per second (L2).
    pub rate_bps: u64,
    /// Bytes (L2) and packets sent through the chute's class.
    pub bytes: u64,
    pub packets: u64,
    /// Packets dropped because the queue was full.
    pub drops: u64,
    /// Times the class was over its rate (a measure of how hard the limit bites).
    pub overlimits: u64,
    /// Bytes queued right now.
    pub backlog_bytes: u64,
}

/// Per-direction statistics; `None` for a direction that is not shaped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShapingStats {
    pub down: Option<DirectionStats>,
    pub up: Option<DirectionStats>,
}

/// Why shaping could not be applied, read or removed.
#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error("qdisc kind {kind:?} is not available in this kernel (needed on {interface})")]
    MissingQdisc {
        kind: &'static str,
        interface: String,
    },
    #[error("interface {interface} disappeared")]
    InterfaceGone { interface: String },
    #[error("cannot use network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("netlink {op} on {interface:?} failed: {message}")]
    Netlink {
        op: &'static str,
        interface: String,
        message: String,
    },
    #[error("invalid {direction} rate: {source}")]
    InvalidRate {
        direction: Direction,
        source: PlanError,
    },
    #[error("no veth interface in network namespace {netns}")]
    NoChuteInterface { netns: PathBuf },
    #[error("network namespace {netns} has several veths ({names:?}) and none is named eth0")]
    AmbiguousInterface { netns: PathBuf, names: Vec<String> },
    #[error(
        "host-side peer (ifindex {ifindex}) of {chute_ifname} in {netns} is not a veth \
         paired with it in the host namespace"
    )]
    PeerNotFound {
        netns: PathBuf,
        chute_ifname: String,
        ifindex: u32,
    },
}

/// Shapes the chute whose network namespace is at `netns` (`/run/netns/X`,
/// `/proc/<pid>/ns/net`, or Podman's SandboxKey), host side in the caller's namespace.
///
/// Idempotent: an existing matching tree is adopted untouched, a changed rate is changed
/// live (class change, no flush), a direction set to `None` is removed. On error, trees
/// this call created are deleted again.
pub async fn shape_chute(netns: &Path, rates: ChuteRates) -> Result<ChuteShaping, ShapeError> {
    Shaper::new().shape_chute(netns, rates).await
}

/// Removes both directions' shaping; fine if the namespace or interfaces are gone.
pub async fn unshape_chute(netns: &Path) -> Result<(), ShapeError> {
    Shaper::new().unshape_chute(netns).await
}

/// Counters and configured rate per direction.
pub async fn chute_stats(netns: &Path) -> Result<ShapingStats, ShapeError> {
    Shaper::new().chute_stats(netns).await
}

/// Shaping with non-default settings; the free functions use `Shaper::new()`.
#[derive(Clone, Debug)]
pub struct Shaper {
    host_netns: Option<PathBuf>,
    link_bps: Option<u64>,
    tbf_leaf: bool,
}

impl Default for Shaper {
    fn default() -> Shaper {
        Shaper::new()
    }
}

struct Sides {
    chute: nl::Link,
    host: nl::Link,
}

impl Shaper {
    /// Host side in the caller's namespace, no link cap, with a TBF leaf.
    pub fn new() -> Shaper {
        Shaper {
            host_netns: None,
            link_bps: None,
            tbf_leaf: true,
        }
    }

    /// Treat the namespace at `path` as the host side (tests, or an agent that lives in
    /// a different namespace from the chutes' bridge).
    pub fn host_netns(mut self, path: impl Into<PathBuf>) -> Shaper {
        self.host_netns = Some(path.into());
        self
    }

    /// Refuse rates above this capacity (bits per second).
    pub fn link_bps(mut self, bps: Option<u64>) -> Shaper {
        self.link_bps = bps;
        self
    }

    /// Put a TBF qdisc under the HTB class instead of the kernel's default FIFO (default:
    /// on). Veths do GSO, so HTB alone sees 64 KB super-packets and releases traffic in
    /// lumps (260 ms of tokens each at 2 mbit; measured +7% over the rate while TCP ramps
    /// up). TBF splits super-packets larger than its burst into MTU-sized segments on
    /// enqueue, so HTB shapes frame by frame; it also bounds the queue (~100 ms).
    pub fn tbf_leaf(mut self, on: bool) -> Shaper {
        self.tbf_leaf = on;
        self
    }

    fn wanted(
        &self,
        dir: Direction,
        bps: Option<u64>,
        ps: &Psched,
    ) -> Result<Option<Wanted>, ShapeError> {
        bps.map(|b| plan::wanted(b, self.link_bps, self.tbf_leaf, ps))
            .transpose()
            .map_err(|source| ShapeError::InvalidRate {
                direction: dir,
                source,
            })
    }

    /// Runs `work` with one netlink connection in the chute's namespace and one on the
    /// host side, both driven for as long as the work runs.
    async fn with_pair<T, F, Fut>(&self, netns: &Path, work: F) -> Result<T, ShapeError>
    where
        F: FnOnce(Pair) -> Fut,
        Fut: Future<Output = Result<T, ShapeError>>,
    {
        let (chute_conn, chute) = nl::connect(Some(netns)).await?;
        let (host_conn, host) = nl::connect(self.host_netns.as_deref()).await?;
        nl::drive(vec![chute_conn, host_conn], work(Pair { host, chute })).await
    }

    /// Shapes both directions; see [`shape_chute`].
    pub async fn shape_chute(
        &self,
        netns: &Path,
        rates: ChuteRates,
    ) -> Result<ChuteShaping, ShapeError> {
        let ps = read_psched();
        let down = self.wanted(Direction::Down, rates.down_bps, &ps)?;
        let up = self.wanted(Direction::Up, rates.up_bps, &ps)?;
        let sides = self
            .with_pair(netns, |p| async move {
                let sides = required_sides(&p, netns).await?;
                let created_down = converge(&p.host, &sides.host, down.as_ref()).await?;
                if let Err(e) = converge(&p.chute, &sides.chute, up.as_ref()).await {
                    if created_down {
                        rollback(&p.host, &sides.host).await;
                    }
                    return Err(e);
                }
                Ok(sides)
            })
            .await?;
        tracing::info!(
            netns = %netns.display(),
            host_if = %sides.host.name,
            chute_if = %sides.chute.name,
            down_bps = ?rates.down_bps,
            up_bps = ?rates.up_bps,
            "chute shaped"
        );
        Ok(ChuteShaping {
            host_ifname: sides.host.name,
            chute_ifname: sides.chute.name,
        })
    }

    /// The changes [`Shaper::shape_chute`] would make now, without making them
    /// (`(download ops, upload ops)`; both empty when the kernel already matches).
    pub async fn plan(
        &self,
        netns: &Path,
        rates: ChuteRates,
    ) -> Result<(Vec<Op>, Vec<Op>), ShapeError> {
        let ps = read_psched();
        let down = self.wanted(Direction::Down, rates.down_bps, &ps)?;
        let up = self.wanted(Direction::Up, rates.up_bps, &ps)?;
        self.with_pair(netns, |p| async move {
            let sides = required_sides(&p, netns).await?;
            let host = nl::read(&p.host, sides.host.index, &sides.host.name).await?;
            let chute = nl::read(&p.chute, sides.chute.index, &sides.chute.name).await?;
            Ok((
                plan::diff(&host.tree, down.as_ref()),
                plan::diff(&chute.tree, up.as_ref()),
            ))
        })
        .await
    }

    /// Removes shaping; see [`unshape_chute`].
    pub async fn unshape_chute(&self, netns: &Path) -> Result<(), ShapeError> {
        if !netns.exists() {
            return Ok(());
        }
        self.with_pair(netns, |p| async move {
            let sides = match sides(&p, netns).await {
                Ok(Some(s)) => s,
                Ok(None)
                | Err(ShapeError::PeerNotFound { .. } | ShapeError::InterfaceGone { .. }) => {
                    return Ok(())
                }
                Err(e) => return Err(e),
            };
            for (h, link) in [(&p.host, &sides.host), (&p.chute, &sides.chute)] {
                match converge(h, link, None).await {
                    Ok(_) | Err(ShapeError::InterfaceGone { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
        .await?;
        tracing::info!(netns = %netns.display(), "chute unshaped");
        Ok(())
    }

    /// Reads counters; see [`chute_stats`].
    pub async fn chute_stats(&self, netns: &Path) -> Result<ShapingStats, ShapeError> {
        self.with_pair(netns, |p| async move {
            let sides = required_sides(&p, netns).await?;
            Ok(ShapingStats {
                down: direction_stats(&p.host, &sides.host).await?,
                up: direction_stats(&p.chute, &sides.chute).await?,
            })
        })
        .await
    }
}

/// Netlink handles into the host's and the chute's namespaces.
struct Pair {
    host: Handle,
    chute: Handle,
}

/// [`sides`] for operations that need both: no veth in the chute is an error.
async fn required_sides(p: &Pair, netns: &Path) -> Result<Sides, ShapeError> {
    sides(p, netns)
        .await?
        .ok_or_else(|| ShapeError::NoChuteInterface {
            netns: netns.to_path_buf(),
        })
}

/// Finds the chute's veth and its host-side peer; `Ok(None)` if the chute has no veth.
async fn sides(p: &Pair, netns: &Path) -> Result<Option<Sides>, ShapeError> {
    let veths: Vec<_> = nl::links(&p.chute)
        .await?
        .into_iter()
        .filter(|l| l.is_veth)
        .collect();
    let chute = match veths.len() {
        0 => return Ok(None),
        1 => veths.into_iter().next().expect("one element"),
        _ => match veths.iter().position(|l| l.name == "eth0") {
            Some(i) => veths.into_iter().nth(i).expect("index from position"),
            None => {
                return Err(ShapeError::AmbiguousInterface {
                    netns: netns.to_path_buf(),
                    names: veths.into_iter().map(|l| l.name).collect(),
                })
            }
        },
    };
    let peer_err = |ifindex| ShapeError::PeerNotFound {
        netns: netns.to_path_buf(),
        chute_ifname: chute.name.clone(),
        ifindex,
    };
    let Some(peer) = chute.peer else {
        return Err(peer_err(0));
    };
    // Ifindexes are per namespace: make sure the link found points back at the chute's.
    let host = nl::link_by_index(&p.host, peer)
        .await?
        .filter(|l| l.is_veth && l.peer == Some(chute.index))
        .ok_or_else(|| peer_err(peer))?;
    Ok(Some(Sides { chute, host }))
}

/// Reads the tree of `link`, applies the minimal diff to `want`. Returns whether it built
/// a new root (so a caller can undo it); on failure undoes its own new root.
async fn converge(h: &Handle, link: &nl::Link, want: Option<&Wanted>) -> Result<bool, ShapeError> {
    let have = nl::read(h, link.index, &link.name).await?;
    let ops = plan::diff(&have.tree, want);
    if ops.is_empty() {
        return Ok(false);
    }
    tracing::debug!(interface = %link.name, ?ops, "applying shaping ops");
    let created = ops.first() == Some(&Op::ReplaceRoot);
    for op in &ops {
        if let Err(e) = nl::apply_op(h, link.index, &link.name, op).await {
            if created {
                rollback(h, link).await;
            }
            return Err(e);
        }
    }
    Ok(created)
}

async fn rollback(h: &Handle, link: &nl::Link) {
    // Best effort: the interface may be the thing that vanished.
    if let Err(e) = nl::apply_op(h, link.index, &link.name, &Op::DeleteRoot).await {
        tracing::warn!(interface = %link.name, error = %e, "could not roll back shaping");
    }
}

async fn direction_stats(
    h: &Handle,
    link: &nl::Link,
) -> Result<Option<DirectionStats>, ShapeError> {
    let rb = nl::read(h, link.index, &link.name).await?;
    let Some(class) = rb.tree.our_class() else {
        return Ok(None);
    };
    let c = rb.class.unwrap_or(rb.root);
    Ok(Some(DirectionStats {
        interface: link.name.clone(),
        rate_bps: class.rate * 8,
        bytes: c.bytes,
        packets: c.packets,
        // A leaf's drops are also counted by the HTB root; its throttling is its own.
        drops: c.drops.max(rb.root.drops),
        overlimits: c.overlimits + rb.leaf.map_or(0, |l| l.overlimits),
        backlog_bytes: c.backlog_bytes,
    }))
}

/// The scheduler clock; every kernel this runs on reports the same, so a missing file
/// (e.g. /proc not mounted) falls back to the modern value rather than failing.
fn read_psched() -> Psched {
    std::fs::read_to_string("/proc/net/psched")
        .ok()
        .and_then(|t| Psched::parse(&t))
        .unwrap_or(Psched::MODERN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: T) {}

    #[test]
    fn futures_are_send_so_the_agent_can_spawn_them() {
        let p = Path::new("/nonexistent");
        assert_send(shape_chute(p, ChuteRates::default()));
        assert_send(unshape_chute(p));
        assert_send(chute_stats(p));
    }
}
