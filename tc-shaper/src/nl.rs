//! The I/O half: rtnetlink connections (optionally inside another network namespace),
//! raw HTB/TBF attribute encoding, tree readback with statistics, and applying ops.

use std::fs::File;
use std::future::Future;
use std::io;
use std::path::Path;

use futures::channel::oneshot;
use futures::future::{select, Either};
use futures::{StreamExt, TryStreamExt};
use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
use rtnetlink::packet_route::tc::{TcAttribute, TcHandle, TcMessage, TcOption, TcStats2};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_utils::nla::{DefaultNla, Nla, NlasIterator};
use rtnetlink::sys::SmolSocket;
use rtnetlink::Handle;

use crate::plan::{HtbClass, Leaf, Op, Root, Tbf, Tree, CLASS_HANDLE, LEAF_HANDLE, ROOT_HANDLE};
use crate::ShapeError;

const TC_H_ROOT: u32 = 0xFFFF_FFFF;
const TC_LINKLAYER_ETHERNET: u8 = 1;

const TCA_HTB_PARMS: u16 = 1;
const TCA_HTB_INIT: u16 = 2;
const TCA_HTB_RATE64: u16 = 6;
const TCA_HTB_CEIL64: u16 = 7;
/// `HTB_VER >> 16`; the kernel refuses any other major version.
const HTB_VERSION: u32 = 3;
/// Rate-to-quantum divisor (tc's default); only matters for classes without a quantum.
const HTB_R2Q: u32 = 10;

const TCA_TBF_PARMS: u16 = 1;
const TCA_TBF_RATE64: u16 = 4;

/// Counters of one qdisc or class, as the kernel reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub bytes: u64,
    pub packets: u64,
    pub drops: u64,
    pub overlimits: u64,
    pub backlog_bytes: u64,
}

/// One interface's tree plus the counters of its root and of our class.
#[derive(Clone, Debug)]
pub struct Readback {
    pub tree: Tree,
    pub root: Counters,
    pub class: Option<Counters>,
    /// Counters of the leaf qdisc under our class, if one is listed.
    pub leaf: Option<Counters>,
}

/// A link as far as shaping cares.
#[derive(Clone, Debug)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub is_veth: bool,
    /// IFLA_LINK: for a veth, the peer's ifindex (in the peer's namespace).
    pub peer: Option<u32>,
}

type Conn = rtnetlink::proto::Connection<RouteNetlinkMessage, SmolSocket>;

/// Opens an rtnetlink socket in the namespace at `netns` (or the caller's when `None`).
///
/// A netlink socket belongs to the namespace it was created in for its whole life, so
/// a short-lived thread enters the namespace, creates the socket and hands it back; the
/// caller's own threads never change namespace.
pub async fn connect(netns: Option<&Path>) -> Result<(Conn, Handle), ShapeError> {
    let Some(path) = netns else {
        let (conn, handle, _) =
            rtnetlink::new_connection_with_socket::<SmolSocket>().map_err(|e| {
                ShapeError::Netns {
                    path: "(current)".into(),
                    source: e,
                }
            })?;
        return Ok((conn, handle));
    };
    let netns_err = |source| ShapeError::Netns {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(netns_err)?;
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("tc-shaper-netns".into())
        .spawn(move || {
            let made = setns(&file, CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)
                .and_then(|()| rtnetlink::new_connection_with_socket::<SmolSocket>());
            // The receiver only goes away if the caller was cancelled; nothing to do then.
            let _ = tx.send(made);
        })
        .map_err(netns_err)?;
    let made = rx
        .await
        .map_err(|_| netns_err(io::Error::other("netns thread exited without a socket")))?;
    let (conn, handle, _) = made.map_err(netns_err)?;
    Ok((conn, handle))
}

/// Runs `work` while driving `conns` (the connections its handles talk through).
pub async fn drive<T>(
    conns: Vec<Conn>,
    work: impl Future<Output = Result<T, ShapeError>>,
) -> Result<T, ShapeError> {
    let conns = futures::future::join_all(conns);
    match select(Box::pin(conns), Box::pin(work)).await {
        Either::Right((out, _)) => out,
        Either::Left((_, _)) => Err(ShapeError::Netlink {
            op: "connection",
            interface: String::new(),
            message: "netlink connection closed".into(),
        }),
    }
}

fn nl_error(op: &'static str, interface: &str, e: &rtnetlink::Error) -> ShapeError {
    if let rtnetlink::Error::NetlinkError(m) = e {
        if m.raw_code() == -libc_enodev() {
            return ShapeError::InterfaceGone {
                interface: interface.to_owned(),
            };
        }
    }
    ShapeError::Netlink {
        op,
        interface: interface.to_owned(),
        message: e.to_string(),
    }
}

fn libc_enodev() -> i32 {
    nix::errno::Errno::ENODEV as i32
}

/// The link with `index` in the connection's namespace, `None` if there is none.
pub async fn link_by_index(handle: &Handle, index: u32) -> Result<Option<Link>, ShapeError> {
    let got: Result<Vec<_>, _> = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_collect()
        .await;
    match got {
        Ok(msgs) => Ok(msgs.into_iter().map(to_link).next()),
        Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc_enodev() => Ok(None),
        Err(e) => Err(nl_error("get link", &index.to_string(), &e)),
    }
}

fn to_link(m: rtnetlink::packet_route::link::LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        is_veth: false,
        peer: None,
    };
    for a in m.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Link(p) => link.peer = Some(p),
            LinkAttribute::LinkInfo(infos) => {
                link.is_veth |= infos.contains(&LinkInfo::Kind(InfoKind::Veth))
            }
            _ => {}
        }
    }
    link
}

/// All links of the connection's namespace.
pub async fn links(handle: &Handle) -> Result<Vec<Link>, ShapeError> {
    let msgs: Vec<_> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl_error("list links", "*", &e))?;
    Ok(msgs.into_iter().map(to_link).collect())
}

fn ratespec(rate: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    // cell_log 0, linklayer ethernet: the kernel computes times itself and wants no rtab.
    b[1] = TC_LINKLAYER_ETHERNET;
    b[4..6].copy_from_slice(&(-1i16).to_ne_bytes()); // cell_align, as tc sends
    b[8..12].copy_from_slice(&u32::try_from(rate).unwrap_or(u32::MAX).to_ne_bytes());
    b
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

fn opt(kind: u16, value: Vec<u8>) -> TcOption {
    TcOption::Other(DefaultNla::new(kind, value))
}

fn htb_root_options() -> Vec<TcOption> {
    let mut glob = Vec::with_capacity(20);
    for v in [HTB_VERSION, HTB_R2Q, CLASS_HANDLE & 0xffff, 0, 0] {
        glob.extend_from_slice(&v.to_ne_bytes());
    }
    vec![opt(TCA_HTB_INIT, glob)]
}

fn htb_class_options(c: &HtbClass) -> Vec<TcOption> {
    let mut p = Vec::with_capacity(44);
    p.extend_from_slice(&ratespec(c.rate));
    p.extend_from_slice(&ratespec(c.ceil));
    for v in [c.buffer, c.cbuffer, c.quantum, 0, 0] {
        p.extend_from_slice(&v.to_ne_bytes());
    }
    let mut opts = vec![opt(TCA_HTB_PARMS, p)];
    // Rates beyond 32 bits of bytes/s (~34 Gbit) travel in their own attributes.
    if c.rate > u64::from(u32::MAX) {
        opts.push(opt(TCA_HTB_RATE64, c.rate.to_ne_bytes().to_vec()));
    }
    if c.ceil > u64::from(u32::MAX) {
        opts.push(opt(TCA_HTB_CEIL64, c.ceil.to_ne_bytes().to_vec()));
    }
    opts
}

fn tbf_options(t: &Tbf) -> Vec<TcOption> {
    let mut p = Vec::with_capacity(36);
    p.extend_from_slice(&ratespec(t.rate));
    p.extend_from_slice(&[0u8; 12]); // no peak rate
    for v in [t.limit, t.buffer, 0] {
        p.extend_from_slice(&v.to_ne_bytes());
    }
    let mut opts = vec![opt(TCA_TBF_PARMS, p)];
    if t.rate > u64::from(u32::MAX) {
        opts.push(opt(TCA_TBF_RATE64, t.rate.to_ne_bytes().to_vec()));
    }
    opts
}

/// The nested attributes inside TCA_OPTIONS of an htb/tbf message, as `(type, value)`.
/// netlink-packet-route keeps options of kinds it does not know as one opaque attribute.
fn nested_options(attrs: &[TcAttribute]) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    for a in attrs {
        let TcAttribute::Options(opts) = a else {
            continue;
        };
        for o in opts {
            let TcOption::Other(nla) = o else { continue };
            let mut raw = vec![0u8; nla.value_len()];
            nla.emit_value(&mut raw);
            for inner in NlasIterator::new(&raw[..]).flatten() {
                out.push((inner.kind() & 0x3fff, inner.value().to_vec()));
            }
        }
    }
    out
}

fn get(opts: &[(u16, Vec<u8>)], kind: u16) -> Option<&[u8]> {
    opts.iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, v)| v.as_slice())
}

fn parse_htb_class(attrs: &[TcAttribute]) -> Option<HtbClass> {
    let opts = nested_options(attrs);
    let p = get(&opts, TCA_HTB_PARMS)?;
    let rate64 = get(&opts, TCA_HTB_RATE64).and_then(|b| u64_at(b, 0));
    let ceil64 = get(&opts, TCA_HTB_CEIL64).and_then(|b| u64_at(b, 0));
    Some(HtbClass {
        rate: rate64.unwrap_or(u64::from(u32_at(p, 8)?)),
        ceil: ceil64.unwrap_or(u64::from(u32_at(p, 20)?)),
        buffer: u32_at(p, 24)?,
        cbuffer: u32_at(p, 28)?,
        quantum: u32_at(p, 32)?,
    })
}

fn parse_htb_default(attrs: &[TcAttribute]) -> Option<u32> {
    u32_at(get(&nested_options(attrs), TCA_HTB_INIT)?, 8)
}

fn parse_tbf(attrs: &[TcAttribute]) -> Option<Tbf> {
    let opts = nested_options(attrs);
    let p = get(&opts, TCA_TBF_PARMS)?;
    let rate64 = get(&opts, TCA_TBF_RATE64).and_then(|b| u64_at(b, 0));
    Some(Tbf {
        rate: rate64.unwrap_or(u64::from(u32_at(p, 8)?)),
        limit: u32_at(p, 24)?,
        buffer: u32_at(p, 28)?,
    })
}

fn kind_of(attrs: &[TcAttribute]) -> String {
    attrs
        .iter()
        .find_map(|a| match a {
            TcAttribute::Kind(k) => Some(k.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn counters(attrs: &[TcAttribute]) -> Counters {
    let mut c = Counters::default();
    for a in attrs {
        match a {
            TcAttribute::Stats2(s) => {
                for s in s {
                    match s {
                        TcStats2::Basic(b) => {
                            c.bytes = b.bytes;
                            c.packets = u64::from(b.packets);
                        }
                        TcStats2::Queue(q) => {
                            c.drops = u64::from(q.drops);
                            c.overlimits = u64::from(q.overlimits);
                            c.backlog_bytes = u64::from(q.backlog);
                        }
                        _ => {}
                    }
                }
            }
            TcAttribute::Stats(s) if c == Counters::default() => {
                c.bytes = s.bytes;
                c.packets = u64::from(s.packets);
                c.drops = u64::from(s.drops);
                c.overlimits = u64::from(s.overlimits);
                c.backlog_bytes = u64::from(s.backlog);
            }
            _ => {}
        }
    }
    c
}

async fn dump(
    handle: &Handle,
    msg: RouteNetlinkMessage,
    op: &'static str,
    interface: &str,
) -> Result<Vec<TcMessage>, ShapeError> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut handle = handle.clone();
    let mut resp = handle
        .request(req)
        .map_err(|e| nl_error(op, interface, &e))?;
    let mut out = Vec::new();
    while let Some(m) = resp.next().await {
        match m.payload {
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewQueueDiscipline(t)
                | RouteNetlinkMessage::NewTrafficClass(t),
            ) => out.push(t),
            NetlinkPayload::Error(e) => {
                return Err(nl_error(op, interface, &rtnetlink::Error::NetlinkError(e)))
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Reads the qdisc/class tree of `ifindex` with statistics.
pub async fn read(handle: &Handle, ifindex: u32, ifname: &str) -> Result<Readback, ShapeError> {
    let index = i32::try_from(ifindex).map_err(|_| ShapeError::InterfaceGone {
        interface: ifname.to_owned(),
    })?;
    let qdiscs = dump(
        handle,
        RouteNetlinkMessage::GetQueueDiscipline(TcMessage::with_index(index)),
        "list qdiscs",
        ifname,
    )
    .await?;
    let mut tree = Tree::empty();
    let mut root_counters = Counters::default();
    let mut leaf_counters = None;
    for q in qdiscs.iter().filter(|q| q.header.index == index) {
        let handle_id = u32::from(q.header.handle);
        let parent = u32::from(q.header.parent);
        let kind = kind_of(&q.attributes);
        if parent == TC_H_ROOT {
            root_counters = counters(&q.attributes);
            tree.root = match (handle_id, kind.as_str()) {
                (0, _) => Root::Default,
                (_, "htb") => Root::Htb {
                    handle: handle_id,
                    default_minor: parse_htb_default(&q.attributes).unwrap_or(0),
                },
                _ => Root::Foreign {
                    handle: handle_id,
                    kind,
                },
            };
        } else if handle_id != 0 && parent >> 16 != 0xffff {
            // ingress/clsact live at ffff:fff1 and are nothing to do with egress shaping.
            let tbf = if kind == "tbf" {
                parse_tbf(&q.attributes)
            } else {
                None
            };
            if parent == CLASS_HANDLE {
                leaf_counters = Some(counters(&q.attributes));
            }
            tree.leaves.push(Leaf {
                handle: handle_id,
                parent,
                tbf,
                kind,
            });
        }
    }
    let mut class_counters = None;
    if let Root::Htb {
        handle: root_handle,
        ..
    } = tree.root
    {
        let classes = dump(
            handle,
            RouteNetlinkMessage::GetTrafficClass(TcMessage::with_index(index)),
            "list classes",
            ifname,
        )
        .await?;
        for c in classes.iter().filter(|c| c.header.index == index) {
            let id = u32::from(c.header.handle);
            if id & 0xffff_0000 != root_handle {
                // A leaf qdisc's own classes (tbf shows one, 10:1) are not the root's.
                continue;
            }
            let params = if kind_of(&c.attributes) == "htb" {
                parse_htb_class(&c.attributes)
            } else {
                None
            };
            if id == CLASS_HANDLE {
                class_counters = Some(counters(&c.attributes));
            }
            // HTB reports its top-level classes' parent as TC_H_ROOT; name the qdisc instead.
            let parent = match u32::from(c.header.parent) {
                TC_H_ROOT => id & 0xffff_0000,
                p => p,
            };
            tree.classes.push((id, parent, params));
        }
    }
    Ok(Readback {
        tree,
        root: root_counters,
        class: class_counters,
        leaf: leaf_counters,
    })
}

fn tc_msg(
    index: i32,
    handle: u32,
    parent: u32,
    kind: &str,
    opts: Option<Vec<TcOption>>,
) -> TcMessage {
    let mut m = TcMessage::with_index(index);
    m.header.handle = TcHandle::from(handle);
    m.header.parent = TcHandle::from(parent);
    m.attributes.push(TcAttribute::Kind(kind.to_owned()));
    if let Some(o) = opts {
        m.attributes.push(TcAttribute::Options(o));
    }
    m
}

/// Whether a request creates a qdisc: decided by the request itself, not by its log
/// label. ENOENT to a qdisc creation means the kernel has no (loadable) qdisc of the kind.
fn creates_qdisc(msg: &RouteNetlinkMessage, flags: u16) -> bool {
    matches!(msg, RouteNetlinkMessage::NewQueueDiscipline(_)) && flags & NLM_F_CREATE != 0
}

async fn ack(
    handle: &Handle,
    msg: RouteNetlinkMessage,
    flags: u16,
    op: &'static str,
    kind: &'static str,
    interface: &str,
) -> Result<(), ShapeError> {
    let creates_qdisc = creates_qdisc(&msg, flags);
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    let mut handle = handle.clone();
    let mut resp = handle
        .request(req)
        .map_err(|e| nl_error(op, interface, &e))?;
    while let Some(m) = resp.next().await {
        if let NetlinkPayload::Error(e) = m.payload {
            if creates_qdisc && e.raw_code() == -(nix::errno::Errno::ENOENT as i32) {
                // The kernel answers ENOENT when it cannot find (or load) the qdisc kind.
                return Err(ShapeError::MissingQdisc {
                    kind,
                    interface: interface.to_owned(),
                });
            }
            return Err(nl_error(op, interface, &rtnetlink::Error::NetlinkError(e)));
        }
    }
    Ok(())
}

/// Executes one op on `ifindex`.
pub async fn apply_op(
    handle: &Handle,
    ifindex: u32,
    ifname: &str,
    op: &Op,
) -> Result<(), ShapeError> {
    let index = i32::try_from(ifindex).map_err(|_| ShapeError::InterfaceGone {
        interface: ifname.to_owned(),
    })?;
    use RouteNetlinkMessage as R;
    match op {
        Op::ReplaceRoot => {
            let m = tc_msg(
                index,
                ROOT_HANDLE,
                TC_H_ROOT,
                "htb",
                Some(htb_root_options()),
            );
            ack(
                handle,
                R::NewQueueDiscipline(m),
                NLM_F_CREATE | NLM_F_REPLACE,
                "replace root qdisc",
                "htb",
                ifname,
            )
            .await
        }
        Op::DeleteRoot => {
            let m = tc_msg(index, ROOT_HANDLE, TC_H_ROOT, "htb", None);
            ack(
                handle,
                R::DelQueueDiscipline(m),
                0,
                "delete root qdisc",
                "htb",
                ifname,
            )
            .await
        }
        Op::CreateClass(c) | Op::ChangeClass(c) => {
            let m = tc_msg(
                index,
                CLASS_HANDLE,
                ROOT_HANDLE,
                "htb",
                Some(htb_class_options(c)),
            );
            let (flags, what) = match op {
                Op::CreateClass(_) => (NLM_F_CREATE | NLM_F_EXCL, "create class"),
                _ => (0, "change class"),
            };
            ack(handle, R::NewTrafficClass(m), flags, what, "htb", ifname).await
        }
        Op::ReplaceLeaf(t) | Op::ChangeLeaf(t) => {
            let m = tc_msg(
                index,
                LEAF_HANDLE,
                CLASS_HANDLE,
                "tbf",
                Some(tbf_options(t)),
            );
            let (flags, what) = match op {
                Op::ReplaceLeaf(_) => (NLM_F_CREATE | NLM_F_REPLACE, "replace leaf qdisc"),
                _ => (0, "change leaf qdisc"),
            };
            ack(handle, R::NewQueueDiscipline(m), flags, what, "tbf", ifname).await
        }
        Op::DeleteLeaf { handle: h } => {
            let mut m = TcMessage::with_index(index);
            m.header.handle = TcHandle::from(*h);
            m.header.parent = TcHandle::from(CLASS_HANDLE);
            ack(
                handle,
                R::DelQueueDiscipline(m),
                0,
                "delete leaf qdisc",
                "tbf",
                ifname,
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{wanted, Psched};

    #[test]
    fn only_a_qdisc_creation_can_mean_a_missing_qdisc_kind() {
        use RouteNetlinkMessage as R;
        let q = || tc_msg(1, ROOT_HANDLE, TC_H_ROOT, "htb", None);
        assert!(creates_qdisc(
            &R::NewQueueDiscipline(q()),
            NLM_F_CREATE | NLM_F_REPLACE
        ));
        assert!(!creates_qdisc(&R::NewQueueDiscipline(q()), 0), "a change");
        assert!(!creates_qdisc(
            &R::NewTrafficClass(q()),
            NLM_F_CREATE | NLM_F_EXCL
        ));
        assert!(!creates_qdisc(&R::DelQueueDiscipline(q()), 0));
    }

    fn as_attrs(kind: &str, opts: Vec<TcOption>) -> Vec<TcAttribute> {
        // What the kernel sends back is the same nest we send; wrap it the way
        // netlink-packet-route parses an unknown kind: one opaque TCA_OPTIONS value.
        let mut raw = vec![0u8; opts.as_slice().buffer_len()];
        opts.as_slice().emit(&mut raw);
        vec![
            TcAttribute::Kind(kind.into()),
            TcAttribute::Options(vec![TcOption::Other(DefaultNla::new(2, raw))]),
        ]
    }

    use rtnetlink::packet_utils::Emitable;

    #[test]
    fn htb_and_tbf_options_round_trip() {
        for bps in [2_000_000u64, 32_000_000, 100_000_000_000] {
            let w = wanted(bps, None, true, &Psched::MODERN).unwrap();
            assert_eq!(
                parse_htb_class(&as_attrs("htb", htb_class_options(&w.class))),
                Some(w.class)
            );
            let t = w.leaf.unwrap();
            assert_eq!(parse_tbf(&as_attrs("tbf", tbf_options(&t))), Some(t));
        }
        assert_eq!(
            parse_htb_default(&as_attrs("htb", htb_root_options())),
            Some(1)
        );
    }

    #[test]
    fn htb_parms_has_kernel_layout() {
        let c = HtbClass {
            rate: 250_000,
            ceil: 250_000,
            buffer: 7,
            cbuffer: 8,
            quantum: 9,
        };
        let TcOption::Other(nla) = &htb_class_options(&c)[0] else {
            panic!()
        };
        assert_eq!(nla.kind(), TCA_HTB_PARMS);
        assert_eq!(nla.value_len(), 44, "sizeof(struct tc_htb_opt)");
    }
}
