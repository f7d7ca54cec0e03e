//! Flow telemetry in the agent: reads the kernel's flow events, keeps the totals per label set,
//! adds the open connections' live counts at scrape time, and keeps a bounded buffer of recent
//! records for `meshlane observe`.
//!
//! Exactness rules (the load generator's and the applications' own counts are the truth):
//! - a closed connection is counted once, from its close event, with the kernel's final
//!   counts; an open one is counted from its flow entry (read at each scrape), never both: the
//!   open entry is dropped when its close event is counted, and its last reading is kept until
//!   then, so no series ever goes down;
//! - closed totals survive a restart: every [`CHECKPOINT_EVERY`] the totals are written to a
//!   checkpoint that names the ring position they include, and only then are the events before
//!   it released to the kernel; a new agent skips to that position and counts what follows
//!   again (see [`crate::ring`]). Open connections need nothing: their counts live in the
//!   pinned flow map.
//!
//! It must never write the kernel's flow map; it only reads it.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use dataplane_common::{
    DATA_HEAD, DataEventOf, Flow, FlowEvent, SockKey, SockStats, flow_event, flow_flags,
    is_loopback, map_names,
};
use meshlane_api::{
    flows::{FlowEnd, FlowKind, FlowQuery, FlowRecord, Flows, Leg, MAX_RECORDS, Reporter},
    types::Pod,
};
use serde::{Deserialize, Serialize};

use crate::{
    Error, Result,
    addr::{ip_key, key_ip},
    http,
    ring::Ring,
};

/// Upper bounds of the RTT histogram, in seconds: OpenTelemetry's default HTTP duration
/// buckets, which cover a same-rack 50 µs to a cross-region 10 s.
pub const RTT_BUCKETS: [f64; 15] = [
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 10.0,
];
/// Upper bounds of the HTTP duration histograms, in seconds (OpenTelemetry's semantic
/// conventions for `http.server.request.duration`).
pub const HTTP_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// (method, status) pairs kept per label set; past this, new ones count as `_OTHER` / 0.
pub const MAX_HTTP_SERIES: usize = 64;

/// A histogram: per-bucket counts (the last slot is +Inf), sum and count.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub buckets: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.buckets.len() != bounds.len() + 1 {
            self.buckets = vec![0; bounds.len() + 1];
        }
        let i = bounds.iter().position(|b| v <= *b).unwrap_or(bounds.len());
        self.buckets[i] += 1;
        self.sum += v;
        self.count += 1;
    }
}

/// HTTP requests of one label set with one method and status, from one side.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HttpSeries {
    /// Measured by the server's socket (`http_server_…`), else the client's.
    pub server: bool,
    pub method: String,
    pub status: u16,
    pub duration: Histogram,
}

/// Label sets kept; past this, new ones are counted under [`Labels::overflow`].
pub const MAX_SERIES: usize = 10_000;
/// Events read per batch.
const BATCH: usize = 4096;
/// How often the totals are checkpointed (and the ring released up to there) while events
/// come: a checkpoint is a file write and rename, too dear for every batch.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// Batches one [`Telemetry::drain`] reads at most.
const DRAIN_BATCHES: usize = 2;
/// An open connection whose flow left the kernel's map without a close event reaching us (the
/// ring was full) is folded into the totals with its last counts after this long.
const LOST_CLOSE_AFTER: Duration = Duration::from_secs(30);

/// Who talked to whom, as the metrics label it (Istio's label names).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Labels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_namespace: String,
    pub destination_workload: String,
    pub destination_namespace: String,
}

impl Labels {
    /// Where counts go once [`MAX_SERIES`] label sets exist.
    fn overflow(reporter: Reporter) -> Labels {
        let o = || "_overflow".to_string();
        Labels {
            reporter,
            source_workload: o(),
            source_namespace: o(),
            destination_workload: o(),
            destination_namespace: o(),
        }
    }

    pub fn pairs(&self) -> [(&'static str, &str); 5] {
        [
            ("reporter", self.reporter.as_str()),
            ("source_workload", &self.source_workload),
            ("source_namespace", &self.source_namespace),
            ("destination_workload", &self.destination_workload),
            ("destination_namespace", &self.destination_namespace),
        ]
    }
}

/// Byte counts of one socket, split by path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bytes {
    pub sent_redirected: u64,
    pub sent_stack: u64,
    pub received_redirected: u64,
    pub received_stack: u64,
}

impl Bytes {
    /// Splits totals by path. Redirected bytes always come first in a stream (a socket that
    /// sent through the stack never redirects again), so the redirected part of what was read
    /// is at most what the peer redirected.
    fn split(sent: u64, sent_redirected: u64, received: u64, peer_redirected: u64) -> Bytes {
        let sr = sent_redirected.min(sent);
        let rr = peer_redirected.min(received);
        Bytes {
            sent_redirected: sr,
            sent_stack: sent - sr,
            received_redirected: rr,
            received_stack: received - rr,
        }
    }

    fn add(&mut self, o: &Bytes) {
        self.sent_redirected += o.sent_redirected;
        self.sent_stack += o.sent_stack;
        self.received_redirected += o.received_redirected;
        self.received_stack += o.received_stack;
    }

    fn max(&self, o: &Bytes) -> Bytes {
        Bytes {
            sent_redirected: self.sent_redirected.max(o.sent_redirected),
            sent_stack: self.sent_stack.max(o.sent_stack),
            received_redirected: self.received_redirected.max(o.received_redirected),
            received_stack: self.received_stack.max(o.received_stack),
        }
    }
}

/// Totals of closed connections for one label set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub opened: u64,
    pub closed: u64,
    pub bytes: Bytes,
    pub retransmits: u64,
    /// Per-bucket counts of closed connections' smoothed RTT (the last slot is +Inf), their
    /// sum in seconds and how many had a sample.
    pub rtt_buckets: Vec<u64>,
    pub rtt_sum: f64,
    pub rtt_count: u64,
    /// HTTP requests by side, method and status.
    #[serde(default)]
    pub http: Vec<HttpSeries>,
    /// Places where an HTTP message had to start but what was there did not parse (or was not
    /// seen).
    #[serde(default)]
    pub http_unparsed: u64,
}

impl Totals {
    fn observe_http(&mut self, server: bool, method: &str, status: u16, seconds: f64) {
        let method = http::method_label(method);
        let i = match self
            .http
            .iter()
            .position(|h| h.server == server && h.method == method && h.status == status)
        {
            Some(i) => i,
            None if self.http.len() < MAX_HTTP_SERIES => {
                self.http.push(HttpSeries {
                    server,
                    method: method.into(),
                    status,
                    duration: Histogram::default(),
                });
                self.http.len() - 1
            }
            None => {
                let i = self
                    .http
                    .iter()
                    .position(|h| h.server == server && h.method == "_OTHER" && h.status == 0);
                match i {
                    Some(i) => i,
                    None => {
                        self.http.push(HttpSeries {
                            server,
                            method: "_OTHER".into(),
                            status: 0,
                            duration: Histogram::default(),
                        });
                        self.http.len() - 1
                    }
                }
            }
        };
        self.http[i].duration.observe(&HTTP_BUCKETS, seconds);
    }

    fn observe_rtt(&mut self, seconds: f64) {
        if self.rtt_buckets.len() != RTT_BUCKETS.len() + 1 {
            self.rtt_buckets = vec![0; RTT_BUCKETS.len() + 1];
        }
        let i = RTT_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(RTT_BUCKETS.len());
        self.rtt_buckets[i] += 1;
        self.rtt_sum += seconds;
        self.rtt_count += 1;
    }
}

/// One label set's series as a scrape shows them: closed totals plus open connections.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    pub totals: Totals,
    pub bytes: Bytes,
}

/// An observed connection not yet counted as closed.
#[derive(Clone, Debug)]
struct Open {
    /// Shared with every count of the flow (cloning it is a reference count, not five strings).
    labels: Arc<Labels>,
    /// The socket's own key and whether it joined the fast path (for request records).
    key: SockKey,
    accelerated: bool,
    /// The highest counts read so far (so a series never goes down).
    last: Bytes,
    /// When the flow was first found missing from the kernel's map, if it is.
    gone_since: Option<Instant>,
}

/// What survives an agent restart (the checkpoint file).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Checkpoint {
    /// The ring buffer map's id: positions only mean something for the same ring.
    ring_id: u32,
    /// Every event before this ring position is in `totals`.
    ring_pos: u64,
    totals: Vec<(Labels, Totals)>,
    series_dropped: u64,
    flows_lost: u64,
}

/// What telemetry needs to know of an enrolled pod.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PodInfo {
    label: String,
    /// Its sidecar's (outbound, inbound) listener ports.
    sidecar: Option<(u16, u16)>,
}

/// Enrolled pods by netns cookie and by IP.
#[derive(Debug, Default)]
struct Names {
    by_netns: HashMap<u64, PodInfo>,
    by_ip: HashMap<[u32; 4], PodInfo>,
}

impl Names {
    fn of(pods: &[Pod]) -> Names {
        let mut n = Names::default();
        for p in pods {
            let info = PodInfo {
                label: p.label(),
                sidecar: p
                    .sidecar
                    .as_ref()
                    .map(|s| (s.outbound_port, s.inbound_port)),
            };
            n.by_netns.insert(p.netns_cookie, info.clone());
            for ip in &p.ips {
                n.by_ip.insert(ip_key(ip), info.clone());
            }
        }
        n
    }

    fn own(&self, key: &SockKey) -> Option<&PodInfo> {
        self.by_netns.get(&key.netns)
    }

    /// The pod at the far end of `key`: the same pod over loopback, else by IP.
    fn remote(&self, key: &SockKey) -> Option<&PodInfo> {
        if is_loopback(&key.remote_ip) {
            self.by_netns.get(&key.netns)
        } else {
            self.by_ip.get(&key.remote_ip)
        }
    }
}

/// The sidecar hop a connection is, from one of its sockets: `active` (it connected),
/// `captured` (it has an original destination), its local and remote ports, and the pods of
/// both ends.
fn leg(
    active: bool,
    captured: bool,
    (local_port, remote_port): (u16, u16),
    own: Option<&PodInfo>,
    remote: Option<&PodInfo>,
) -> Option<Leg> {
    let (client, server, server_port) = if active {
        (own, remote, remote_port)
    } else {
        (remote, own, local_port)
    };
    let same_pod = matches!((client, server), (Some(c), Some(s)) if c == s);
    if captured {
        let (outbound, inbound) = server?.sidecar?;
        if server_port == outbound && same_pod {
            return Some(Leg::AppToProxy);
        }
        if server_port == inbound {
            return Some(Leg::Inbound);
        }
        return None;
    }
    client?.sidecar?;
    Some(if same_pod {
        Leg::ProxyToApp
    } else {
        Leg::ProxyToUpstream
    })
}

/// `(workload, namespace)` of a pod label: NAMESPACE/NAME, or `pod-<id>` for an unnamed pod;
/// `unknown` for what is not a pod of this node.
fn workload(pod: Option<&String>) -> (String, String) {
    match pod.and_then(|p| p.split_once('/')) {
        Some((ns, name)) => (name.to_string(), ns.to_string()),
        None => (
            pod.cloned().unwrap_or_else(|| "unknown".into()),
            "unknown".into(),
        ),
    }
}

pub struct Telemetry {
    ring: Ring,
    /// The ring's map (its fd is what the agent waits on for new events).
    ring_map: MapData,
    ring_id: u32,
    pub(crate) ring_bytes: u32,
    flows: BpfHashMap<MapData, u64, Flow>,
    http_next: BpfHashMap<MapData, u64, [u64; 2]>,
    /// HTTP state of observed sockets, with the copy positions last given to the kernel.
    conns: HashMap<u64, (http::Conn, [u64; 2])>,
    checkpoint: PathBuf,
    /// Wall clock minus CLOCK_MONOTONIC, in ns, to date kernel timestamps.
    realtime_offset_ns: i128,
    names: Names,
    totals: BTreeMap<Labels, Totals>,
    open: HashMap<u64, Open>,
    records: VecDeque<FlowRecord>,
    next_seq: u64,
    pub(crate) events: u64,
    series_dropped: u64,
    flows_lost: u64,
    problem: Option<String>,
    /// The batch being counted: each record's length (u32) then its bytes, reused.
    batch: Vec<u8>,
    /// When the last checkpoint was written.
    saved_at: Instant,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("ring", &self.ring)
            .field("open", &self.open.len())
            .finish_non_exhaustive()
    }
}

/// The checkpoint file beside the state file.
pub fn checkpoint_path(state_file: &Path) -> PathBuf {
    let mut name = state_file.file_name().unwrap_or_default().to_os_string();
    name.push(".telemetry");
    state_file.with_file_name(name)
}

impl Telemetry {
    /// Takes over the ring and the flow map, and the closed totals of an earlier agent from the
    /// checkpoint (skipping the events it had counted).
    pub fn new(
        ring_map: MapData,
        ring_bytes: u32,
        flows: BpfHashMap<MapData, u64, Flow>,
        http_next: BpfHashMap<MapData, u64, [u64; 2]>,
        checkpoint: PathBuf,
    ) -> Result<Telemetry> {
        let ring_id = ring_map
            .info()
            .map_err(|source| Error::Map {
                name: map_names::EVENTS,
                source,
            })?
            .id();
        use std::os::fd::AsFd as _;
        let mut ring = Ring::new(ring_map.fd().as_fd(), ring_bytes)
            .map_err(|e| Error::io("mapping the flow event ring", map_names::EVENTS, e))?;
        // A checkpoint that cannot be read must not keep the dataplane from starting: it is
        // kept aside for inspection, the closed totals start from 0, and status says so.
        let mut problem = None;
        let saved: Checkpoint = match std::fs::read(&checkpoint) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(c) => c,
                Err(e) => {
                    let aside = checkpoint.with_extension("telemetry.bad");
                    let kept = std::fs::rename(&checkpoint, &aside);
                    let msg = format!(
                        "telemetry checkpoint {} is unreadable ({e}); closed-connection totals \
                         restarted from 0, the file {}",
                        checkpoint.display(),
                        match kept {
                            Ok(()) => format!("kept as {}", aside.display()),
                            Err(e) => format!("could not be moved aside: {e}"),
                        }
                    );
                    tracing::error!("{msg}");
                    problem = Some(msg);
                    Checkpoint::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Checkpoint::default(),
            Err(e) => return Err(Error::io("reading", &checkpoint, e)),
        };
        let mut totals = BTreeMap::new();
        let (mut series_dropped, mut flows_lost) = (0, 0);
        if saved.ring_id == ring_id {
            ring.skip_to(saved.ring_pos);
            totals = saved.totals.into_iter().collect();
            series_dropped = saved.series_dropped;
            flows_lost = saved.flows_lost;
        } else if saved.ring_id != 0 {
            tracing::info!(
                file = %checkpoint.display(),
                "the telemetry checkpoint is for another ring buffer (the maps were re-created); totals start from 0"
            );
        }
        Ok(Telemetry {
            ring,
            ring_map,
            ring_id,
            ring_bytes,
            flows,
            http_next,
            conns: HashMap::new(),
            checkpoint,
            realtime_offset_ns: crate::sys::clock_ns(libc::CLOCK_REALTIME)
                - crate::sys::clock_ns(libc::CLOCK_MONOTONIC),
            names: Names::default(),
            totals,
            open: HashMap::new(),
            records: VecDeque::new(),
            next_seq: 1,
            events: 0,
            series_dropped,
            flows_lost,
            problem,
            batch: Vec::new(),
            saved_at: Instant::now(),
        })
    }

    /// What went wrong at start (an unreadable checkpoint), if anything.
    pub fn problem(&self) -> Option<&str> {
        self.problem.as_deref()
    }

    /// The ring's fd: readable (epoll) when the kernel has added events.
    pub fn ring_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd as _;
        self.ring_map.fd().as_fd()
    }

    /// The enrolled pods changed.
    pub fn set_pods(&mut self, pods: &[Pod]) {
        self.names = Names::of(pods);
        // Connections open before this agent started are only in the kernel's map: known now
        // (with their pods' names), their payload records are parsed from their next message.
        match self.flows.iter().collect::<Result<Vec<(u64, Flow)>, _>>() {
            Ok(flows) => {
                for (_, flow) in flows {
                    if flow.flags & flow_flags::OBSERVED != 0 {
                        self.adopt(&flow);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the open flows"),
        }
    }

    /// Keeps an open flow not seen before (its open event was before this agent, or lost).
    fn adopt(&mut self, flow: &Flow) {
        if !self.open.contains_key(&flow.cookie) {
            let labels = self.labels(flow);
            self.open.insert(
                flow.cookie,
                Open {
                    labels,
                    key: flow.key,
                    accelerated: flow.flags & flow_flags::ACCELERATED != 0,
                    last: Bytes::default(),
                    gone_since: None,
                },
            );
        }
    }

    fn labels(&mut self, flow: &Flow) -> Arc<Labels> {
        let own = self.names.own(&flow.key).map(|p| &p.label);
        let remote = self.names.remote(&flow.key).map(|p| &p.label);
        let (reporter, src, dst) = if flow.flags & flow_flags::ACTIVE != 0 {
            (Reporter::Source, own, remote)
        } else {
            (Reporter::Destination, remote, own)
        };
        let (source_workload, source_namespace) = workload(src);
        let (destination_workload, destination_namespace) = workload(dst);
        let l = Labels {
            reporter,
            source_workload,
            source_namespace,
            destination_workload,
            destination_namespace,
        };
        Arc::new(
            if self.totals.contains_key(&l) || self.totals.len() < MAX_SERIES {
                l
            } else {
                self.series_dropped += 1;
                Labels::overflow(reporter)
            },
        )
    }

    /// Reads and counts the pending events (a bounded number per call), and at most every
    /// [`CHECKPOINT_EVERY`] (or when a quarter of the ring is read but held) makes the totals
    /// durable and only then releases what they include to the kernel. Returns how many
    /// events were read.
    pub fn drain(&mut self) -> Result<usize> {
        let mut total = 0;
        // A bounded amount per call: the caller holds the agent's lock, and the API must not
        // wait behind a node that produces events as fast as they are read.
        for _ in 0..DRAIN_BATCHES {
            // Copied out of the ring first (counting needs `self` whole), into one buffer.
            let mut batch = std::mem::take(&mut self.batch);
            batch.clear();
            let records = self.ring.read(BATCH, |b| {
                batch.extend_from_slice(&(b.len() as u32).to_ne_bytes());
                batch.extend_from_slice(b);
            });
            total += records;
            let mut rest = &batch[..];
            while let Some((len, tail)) = rest.split_first_chunk::<4>() {
                let (b, tail) = tail.split_at(u32::from_ne_bytes(*len) as usize);
                rest = tail;
                if crate::ring::record::<u32>(b) == Some(flow_event::DATA) {
                    if let Some(head) = crate::ring::record::<DataEventOf<0>>(b) {
                        let data = &b[DATA_HEAD..];
                        self.count_data(&head, &data[..data.len().min(head.len as usize)]);
                    }
                } else if let Some(ev) = crate::ring::record::<FlowEvent>(b) {
                    self.count(&ev);
                }
            }
            self.batch = batch;
            if records < BATCH {
                break;
            }
        }
        let held = self.ring.unreleased();
        if held > 0
            && (self.saved_at.elapsed() >= CHECKPOINT_EVERY
                || held > u64::from(self.ring_bytes) / 4)
        {
            self.checkpoint()?;
        }
        Ok(total)
    }

    /// Makes the totals durable with the ring position they include, then releases the ring up
    /// to there. A checkpoint that cannot be written releases nothing: this agent never reads
    /// an event twice (its cursor is ahead), and a successor starting from the last good
    /// checkpoint counts the held events again; if writing keeps failing, the ring fills and
    /// the kernel counts what it drops.
    pub fn checkpoint(&mut self) -> Result<()> {
        let (pos, held) = (self.ring.cursor(), self.ring.unreleased());
        self.saved_at = Instant::now();
        self.save(pos).map_err(|e| {
            Error::Internal(format!(
                "{e}; {held} bytes of counted flow events stay in the ring until a checkpoint \
                 can be written"
            ))
        })?;
        self.ring.release();
        Ok(())
    }

    /// Whether events are waiting in the ring.
    pub fn pending(&self) -> bool {
        self.ring.has_records()
    }

    /// Bytes of events in the ring not read yet.
    pub fn backlog(&self) -> u64 {
        self.ring.backlog()
    }

    fn save(&self, ring_pos: u64) -> Result<()> {
        let c = Checkpoint {
            ring_id: self.ring_id,
            ring_pos,
            totals: self
                .totals
                .iter()
                .map(|(l, t)| (l.clone(), t.clone()))
                .collect(),
            series_dropped: self.series_dropped,
            flows_lost: self.flows_lost,
        };
        let body = serde_json::to_vec(&c)
            .map_err(|e| Error::Internal(format!("encoding the telemetry checkpoint: {e}")))?;
        let tmp = self.checkpoint.with_extension("tmp");
        std::fs::write(&tmp, body).map_err(|e| Error::io("writing", &tmp, e))?;
        std::fs::rename(&tmp, &self.checkpoint)
            .map_err(|e| Error::io("replacing", &self.checkpoint, e))
    }

    fn count(&mut self, ev: &FlowEvent) {
        self.events += 1;
        let flow = &ev.flow;
        match ev.kind {
            flow_event::OPEN => {
                let labels = match self.open.get(&flow.cookie) {
                    Some(o) => o.labels.clone(),
                    None => {
                        let labels = self.labels(flow);
                        self.open.insert(
                            flow.cookie,
                            Open {
                                labels: labels.clone(),
                                key: flow.key,
                                accelerated: flow.flags & flow_flags::ACCELERATED != 0,
                                last: Bytes::default(),
                                gone_since: None,
                            },
                        );
                        labels
                    }
                };
                self.totals_of(&labels).opened += 1;
            }
            flow_event::CLOSE => {
                let labels = match self.open.get(&flow.cookie) {
                    Some(o) => o.labels.clone(),
                    None => self.labels(flow),
                };
                if let Some((mut conn, _)) = self.conns.remove(&flow.cookie) {
                    let mut out = Vec::new();
                    conn.close(ev.at_ns, &mut out);
                    self.count_http(flow.cookie, &labels, out);
                    // The kernel's entry goes with the socket's flow (it is an LRU as well).
                    let _gone_is_fine = self.http_next.remove(&flow.cookie);
                }
                self.open.remove(&flow.cookie);
                let t = self.totals_of(&labels);
                t.closed += 1;
                t.bytes.add(&Bytes::split(
                    flow.sent,
                    flow.sent_redirected,
                    flow.received,
                    flow.peer_redirected,
                ));
                t.retransmits += u64::from(flow.retransmits);
                if flow.srtt_us > 0 {
                    t.observe_rtt(f64::from(flow.srtt_us) / 1e6);
                }
            }
            _ => return,
        }
        let record = self.record(ev);
        if self.records.len() == MAX_RECORDS {
            self.records.pop_front();
        }
        self.records.push_back(record);
    }

    /// A payload record: feeds the socket's HTTP parser, counts what it completed, and tells
    /// the kernel where to copy from next when that changed.
    fn count_data(&mut self, ev: &DataEventOf<0>, data: &[u8]) {
        self.events += 1;
        let Some(open) = self.open.get(&ev.cookie) else {
            // The flow's open event was lost: its role is unknown, so it is not parsed.
            tracing::debug!(
                cookie = ev.cookie,
                "payload of a flow without its open event"
            );
            return;
        };
        let role = match open.labels.reporter {
            Reporter::Source => http::Role::Client,
            Reporter::Destination => http::Role::Server,
        };
        let (conn, given) = self.conns.entry(ev.cookie).or_insert_with(|| {
            // Bytes moved before this record were never given to a parser (the connection
            // was open when this agent started, or its first records were lost): look for
            // the next message start instead of taking this one for the stream's first.
            let conn = if ev.offset > 0 {
                http::Conn::joined(role)
            } else {
                http::Conn::new(role)
            };
            (conn, [0, 0])
        });
        let len = data.len();
        let mut out = Vec::new();
        tracing::trace!(
            cookie = ev.cookie,
            dir = ev.dir,
            offset = ev.offset,
            end = ev.end,
            len,
            no_buffer = ev.no_buffer,
            head = %String::from_utf8_lossy(&data[..len.min(24)]),
            "payload"
        );
        conn.feed(
            http::Chunk {
                dir: if ev.dir == 0 {
                    http::Dir::Write
                } else {
                    http::Dir::Read
                },
                offset: ev.offset,
                end: ev.end,
                data,
                at_ns: ev.at_ns,
            },
            &mut out,
        );
        // The kernel needs a new position only to skip (a body beyond this call, or a stream
        // that is not HTTP) or to go back (a lost stream: copy whole calls again). A message
        // that starts where a call starts, the usual case, needs no update: the kernel then
        // copies from the call's start. So at most one map update per body, not per message.
        // Only this record's direction can have moved: the other one was decided by its own
        // last record (and a stale value there is harmless, the kernel copies from the later of
        // it and the call's start).
        let next = conn.next();
        let d = (ev.dir & 1) as usize;
        if next[d] != given[d] && (next[d] > ev.end || next[d] < given[d]) {
            *given = next;
            if let Err(e) = self.http_next.insert(ev.cookie, next, 0) {
                tracing::debug!(error = %e, "telling the kernel where the next HTTP message is");
            }
        }
        if !out.is_empty()
            && let Some(labels) = self.open.get(&ev.cookie).map(|o| o.labels.clone())
        {
            self.count_http(ev.cookie, &labels, out);
        }
    }

    /// The totals of a label set, created at first use.
    fn totals_of(&mut self, labels: &Labels) -> &mut Totals {
        // Looked up first: `entry` needs an owned key, five strings to clone per count.
        if !self.totals.contains_key(labels) {
            self.totals.insert(labels.clone(), Totals::default());
        }
        self.totals.get_mut(labels).expect("inserted above")
    }

    fn count_http(&mut self, cookie: u64, labels: &Labels, out: Vec<http::Event>) {
        for e in out {
            let t = self.totals_of(labels);
            match e {
                http::Event::Unparsed => t.http_unparsed += 1,
                http::Event::Exchange(x) => {
                    let server = labels.reporter == Reporter::Destination;
                    t.observe_http(server, &x.method, x.status, x.duration_ns as f64 / 1e9);
                    let record = self.request_record(cookie, labels, &x);
                    if self.records.len() == MAX_RECORDS {
                        self.records.pop_front();
                    }
                    self.records.push_back(record);
                }
            }
        }
    }

    /// The `request` record of an exchange, with the connection's ends from its flow.
    fn request_record(&mut self, cookie: u64, labels: &Labels, x: &http::Exchange) -> FlowRecord {
        let seq = self.next_seq;
        self.next_seq += 1;
        let now = crate::sys::clock_ns(libc::CLOCK_REALTIME);
        let open = self.open.get(&cookie).map(|o| (o.key, o.accelerated));
        let end = |ip: [u32; 4], port: u32, pod: Option<String>| FlowEnd {
            ip: key_ip(ip),
            port: port as u16,
            pod,
        };
        let pod = |w: &str, ns: &str| (ns != "unknown").then(|| format!("{ns}/{w}"));
        let (source, destination) = match &open {
            Some((key, _)) => {
                let own = end(
                    key.local_ip,
                    key.local_port,
                    self.names.own(key).map(|p| p.label.clone()),
                );
                let remote = end(
                    key.remote_ip,
                    key.remote_port,
                    self.names.remote(key).map(|p| p.label.clone()),
                );
                if labels.reporter == Reporter::Source {
                    (own, remote)
                } else {
                    (remote, own)
                }
            }
            None => {
                let unknown = |p| end([0; 4], 0, p);
                (
                    unknown(pod(&labels.source_workload, &labels.source_namespace)),
                    unknown(pod(
                        &labels.destination_workload,
                        &labels.destination_namespace,
                    )),
                )
            }
        };
        FlowRecord {
            seq,
            time_ms: (now / 1_000_000).max(0) as u64,
            kind: FlowKind::Request,
            protocol: "http".into(),
            reporter: labels.reporter,
            source,
            destination,
            original_destination: None,
            accelerated: open.is_some_and(|(_, a)| a),
            leg: None,
            method: Some(x.method.clone()),
            path: Some(x.path.clone()),
            status: Some(x.status),
            duration_ms: Some(x.duration_ns as f64 / 1e6),
            sent_bytes: None,
            sent_redirected_bytes: None,
            received_bytes: None,
            received_redirected_bytes: None,
            srtt_us: None,
            retransmits: None,
        }
    }

    fn record(&mut self, ev: &FlowEvent) -> FlowRecord {
        let flow = &ev.flow;
        let end = |ip: &[u32; 4], port: u32, pod: Option<&String>| FlowEnd {
            ip: key_ip(*ip),
            port: port as u16,
            pod: pod.cloned(),
        };
        let (own_pod, remote_pod) = (self.names.own(&flow.key), self.names.remote(&flow.key));
        let own = end(
            &flow.key.local_ip,
            flow.key.local_port,
            own_pod.map(|p| &p.label),
        );
        let remote = end(
            &flow.key.remote_ip,
            flow.key.remote_port,
            remote_pod.map(|p| &p.label),
        );
        let active = flow.flags & flow_flags::ACTIVE != 0;
        let leg = leg(
            active,
            flow.orig_dst.port != 0,
            (flow.key.local_port as u16, flow.key.remote_port as u16),
            own_pod,
            remote_pod,
        );
        let (reporter, source, destination) = if active {
            (Reporter::Source, own, remote)
        } else {
            (Reporter::Destination, remote, own)
        };
        let close = ev.kind == flow_event::CLOSE;
        let b = Bytes::split(
            flow.sent,
            flow.sent_redirected,
            flow.received,
            flow.peer_redirected,
        );
        let seq = self.next_seq;
        self.next_seq += 1;
        let at = i128::from(ev.at_ns) + self.realtime_offset_ns;
        FlowRecord {
            seq,
            time_ms: (at / 1_000_000).max(0) as u64,
            kind: if close {
                FlowKind::Close
            } else {
                FlowKind::Open
            },
            protocol: "tcp".into(),
            reporter,
            source,
            destination,
            original_destination: (flow.orig_dst.port != 0)
                .then(|| SocketAddr::new(key_ip(flow.orig_dst.ip), flow.orig_dst.port as u16)),
            accelerated: flow.flags & flow_flags::ACCELERATED != 0,
            leg,
            method: None,
            path: None,
            status: None,
            duration_ms: close.then(|| ev.at_ns.saturating_sub(flow.opened_ns) as f64 / 1e6),
            sent_bytes: close.then_some(flow.sent),
            sent_redirected_bytes: close.then_some(b.sent_redirected),
            received_bytes: close.then_some(flow.received),
            received_redirected_bytes: close.then_some(b.received_redirected),
            srtt_us: (close && flow.srtt_us > 0).then_some(flow.srtt_us),
            retransmits: close.then_some(flow.retransmits),
        }
    }

    /// The series as a scrape shows them: closed totals plus the open connections' counts read
    /// from the kernel now (`stats`: the fast path's per-socket counters, for the path split).
    pub fn series(
        &mut self,
        stats: &BpfHashMap<MapData, SockKey, SockStats>,
    ) -> Result<BTreeMap<Labels, Series>> {
        let mut seen = std::collections::HashSet::new();
        let flows: Vec<(u64, Flow)> =
            self.flows
                .iter()
                .collect::<Result<_, _>>()
                .map_err(|source| Error::Map {
                    name: map_names::FLOWS,
                    source,
                })?;
        for (_, flow) in flows {
            if flow.flags & flow_flags::OBSERVED == 0 {
                continue;
            }
            seen.insert(flow.cookie);
            let own = stats.get(&flow.key, 0).ok();
            let peer = own.and_then(|s| stats.get(&flow.key.peer(s.peer_netns), 0).ok());
            let now = Bytes::split(
                flow.sent,
                own.map_or(0, |s| s.redirected_bytes),
                flow.received,
                peer.map_or(0, |s| s.redirected_bytes),
            );
            self.adopt(&flow);
            if let Some(o) = self.open.get_mut(&flow.cookie) {
                o.last = o.last.max(&now);
                o.gone_since = None;
            }
        }
        // Flows gone from the kernel's map: their close event is on its way (keep their last
        // counts until it is counted), or was lost with a full ring.
        let now = Instant::now();
        let mut lost = Vec::new();
        for (cookie, o) in &mut self.open {
            if seen.contains(cookie) {
                continue;
            }
            let since = *o.gone_since.get_or_insert(now);
            if now.duration_since(since) > LOST_CLOSE_AFTER {
                lost.push(*cookie);
            }
        }
        for cookie in lost {
            // Its HTTP state goes too (its close, which would have ended it, never came).
            self.conns.remove(&cookie);
            let _gone_is_fine = self.http_next.remove(&cookie);
            if let Some(o) = self.open.remove(&cookie) {
                let t = self.totals_of(&o.labels);
                t.closed += 1;
                t.bytes.add(&o.last);
                self.flows_lost += 1;
            }
        }
        let mut out: BTreeMap<Labels, Series> = self
            .totals
            .iter()
            .map(|(l, t)| {
                (
                    l.clone(),
                    Series {
                        totals: t.clone(),
                        bytes: t.bytes,
                    },
                )
            })
            .collect();
        for o in self.open.values() {
            match out.get_mut(&*o.labels) {
                Some(s) => s.bytes.add(&o.last),
                None => {
                    let mut s = Series::default();
                    s.bytes.add(&o.last);
                    out.insert((*o.labels).clone(), s);
                }
            }
        }
        Ok(out)
    }

    /// Label sets not kept because [`MAX_SERIES`] was reached, and connections whose close
    /// event never arrived.
    pub fn losses(&self) -> (u64, u64) {
        (self.series_dropped, self.flows_lost)
    }

    pub fn open_flows(&self) -> usize {
        self.open.len()
    }

    /// The records a query selects.
    pub fn query(&self, q: &FlowQuery) -> Flows {
        let since = q.since.unwrap_or(0);
        let first = self.records.front().map_or(self.next_seq, |r| r.seq);
        let missed = first.saturating_sub(since + 1);
        let mut records: Vec<FlowRecord> = self
            .records
            .iter()
            .filter(|r| r.seq > since && q.matches(r))
            .cloned()
            .collect();
        let last = q.last.unwrap_or(100);
        if records.len() > last {
            records.drain(..records.len() - last);
        }
        Flows {
            records,
            next: self.next_seq - 1,
            missed: if q.since.is_some() { missed } else { 0 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_split_puts_redirected_bytes_first() {
        // A stack socket: nothing redirected.
        assert_eq!(
            Bytes::split(100, 0, 50, 0),
            Bytes {
                sent_stack: 100,
                received_stack: 50,
                ..Bytes::default()
            }
        );
        // sk_msg counts a message before the tracepoint adds it: never more than was sent.
        assert_eq!(Bytes::split(100, 150, 80, 200).sent_redirected, 100);
        assert_eq!(Bytes::split(100, 150, 80, 200).sent_stack, 0);
        assert_eq!(Bytes::split(100, 150, 80, 200).received_redirected, 80);
        // Moved off the fast path half way: the first 60 redirected, the rest stack.
        let b = Bytes::split(100, 60, 100, 60);
        assert_eq!((b.sent_redirected, b.sent_stack), (60, 40));
        assert_eq!((b.received_redirected, b.received_stack), (60, 40));
    }

    #[test]
    fn rtt_buckets_cover_everything() {
        let mut t = Totals::default();
        t.observe_rtt(0.00005);
        t.observe_rtt(0.02);
        t.observe_rtt(60.0);
        assert_eq!(t.rtt_buckets.len(), RTT_BUCKETS.len() + 1);
        assert_eq!(t.rtt_buckets[0], 1);
        assert_eq!(t.rtt_buckets[5], 1, "0.02 s is in the 0.025 bucket");
        assert_eq!(t.rtt_buckets[RTT_BUCKETS.len()], 1, "+Inf");
        assert_eq!(t.rtt_count, 3);
    }

    #[test]
    fn legs_of_a_sidecar_mesh() {
        let pod = |name: &str, sidecar: bool| PodInfo {
            label: name.into(),
            sidecar: sidecar.then_some((15001, 15006)),
        };
        let (a, b, plain) = (pod("ns/a", true), pod("ns/b", true), pod("ns/c", false));
        // a's app → a's proxy over loopback, captured; both sockets say so.
        assert_eq!(
            leg(true, true, (40000, 15001), Some(&a), Some(&a)),
            Some(Leg::AppToProxy)
        );
        assert_eq!(
            leg(false, true, (15001, 40000), Some(&a), Some(&a)),
            Some(Leg::AppToProxy)
        );
        // a's proxy (or a pod without a sidecar) → b, captured to b's inbound listener.
        for client in [&a, &plain] {
            assert_eq!(
                leg(true, true, (40001, 15006), Some(client), Some(&b)),
                Some(Leg::Inbound)
            );
            assert_eq!(
                leg(false, true, (15006, 40001), Some(&b), Some(client)),
                Some(Leg::Inbound)
            );
        }
        // b's proxy → b's app (its own address), not captured.
        assert_eq!(
            leg(true, false, (40002, 8080), Some(&b), Some(&b)),
            Some(Leg::ProxyToApp)
        );
        assert_eq!(
            leg(false, false, (8080, 40002), Some(&b), Some(&b)),
            Some(Leg::ProxyToApp)
        );
        // a's proxy → a pod without a sidecar, or off the node: its upstream.
        assert_eq!(
            leg(true, false, (40003, 80), Some(&a), Some(&plain)),
            Some(Leg::ProxyToUpstream)
        );
        assert_eq!(
            leg(true, false, (40003, 80), Some(&a), None),
            Some(Leg::ProxyToUpstream)
        );
        // Pods without sidecars have no legs.
        assert_eq!(
            leg(true, false, (40004, 80), Some(&plain), Some(&plain)),
            None
        );
        assert_eq!(leg(false, false, (80, 40004), Some(&plain), None), None);
    }

    #[test]
    fn workloads_from_pod_labels() {
        assert_eq!(
            workload(Some(&"shop/web-1".to_string())),
            ("web-1".into(), "shop".into())
        );
        assert_eq!(
            workload(Some(&"pod-3".to_string())),
            ("pod-3".into(), "unknown".into())
        );
        assert_eq!(workload(None), ("unknown".into(), "unknown".into()));
    }
}
