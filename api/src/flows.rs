//! Flow telemetry as the agent shows it: the records `meshlane observe` prints (one JSON object
//! per line with `--json`), the query that selects them, and telemetry's part of `status`.
//!
//! Every byte count is from one socket's side, the reporter's: `sent_bytes` is what the
//! reporter's application wrote, `received_bytes` what it read. A connection between two
//! observed pods of one node is reported twice, once by each end (`reporter` says which), as
//! Istio reports its TCP metrics.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// Largest `last` a query may ask for (the agent keeps at most this many records).
pub const MAX_RECORDS: usize = 10_000;

/// What a record reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowKind {
    /// A connection was established.
    Open,
    /// A connection ended (its socket was destroyed, after the application's last read); the
    /// record carries its totals.
    Close,
    /// An HTTP request and its response, as the reporter's socket saw them.
    Request,
}

/// Which end of the connection measured it (Istio's `reporter` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reporter {
    /// The connecting side (the client).
    Source,
    /// The accepting side (the server).
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// Which hop of a sidecar mesh a connection is (from where the kernel captured it), so the
/// hops of one request can be told apart and stitched together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Leg {
    /// The application's connect, captured to its own pod's outbound listener (loopback).
    AppToProxy,
    /// A connect captured to a sidecar pod's inbound listener (from another pod's proxy or an
    /// application without a sidecar).
    Inbound,
    /// An uncaptured connection inside a sidecar pod: the proxy delivering to its application
    /// (over loopback or the pod's own address).
    ProxyToApp,
    /// An uncaptured connection out of a sidecar pod to another pod or off the node: the
    /// proxy's upstream (or a port or CIDR the pod excludes from capture).
    ProxyToUpstream,
}

/// One end of a connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEnd {
    pub ip: IpAddr,
    pub port: u16,
    /// NAMESPACE/NAME of the pod on this node that owns this end; none for an address that is
    /// not an enrolled pod of this node (another node, the host, outside the cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// One flow event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// Position in the agent's stream (increasing, no gaps while the agent runs).
    pub seq: u64,
    /// When it happened, milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub kind: FlowKind,
    /// Always `tcp` for now.
    pub protocol: String,
    pub reporter: Reporter,
    /// The connecting side.
    pub source: FlowEnd,
    /// The accepting side (for a captured connection: the proxy the kernel sent it to).
    pub destination: FlowEnd,
    /// For a captured connection (the application's connect sent to its sidecar proxy): where
    /// the application meant to go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_destination: Option<SocketAddr>,
    /// The reporter's socket joined the fast path (its messages may be redirected).
    pub accelerated: bool,
    /// For connections of sidecar pods: which hop this is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leg: Option<Leg>,
    /// Request only: the HTTP method, the request target (path and query, at most 256
    /// characters), the response's status code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Close: the connection's life, open to close, in milliseconds. Request: the request's
    /// duration as the reporter saw it (server: request's first byte read → response's last
    /// byte written; client: request's first byte written → response's last byte read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
    /// Close only: bytes the reporter's application wrote; of them, those redirected socket to
    /// socket (the rest went through the stack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_redirected_bytes: Option<u64>,
    /// Close only: bytes the reporter's application read; of them, those that came
    /// redirected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_redirected_bytes: Option<u64>,
    /// Close only: smoothed RTT in µs (absent when the stack took no sample: redirected
    /// connections carry no data through it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub srtt_us: Option<u32>,
    /// Close only: segments the reporter's TCP retransmitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retransmits: Option<u32>,
}

impl FlowRecord {
    /// The pods of both ends (for filters).
    pub fn pods(&self) -> impl Iterator<Item = &str> {
        [&self.source.pod, &self.destination.pod]
            .into_iter()
            .filter_map(|p| p.as_deref())
    }
}

/// Which records a `flows` request wants. Every filter must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowQuery {
    /// Only records after this `seq` (what the previous answer's `next` was).
    #[serde(default)]
    pub since: Option<u64>,
    /// At most this many, the newest (default 100, at most [`MAX_RECORDS`]).
    #[serde(default)]
    pub last: Option<usize>,
    /// Either end is this pod (NAMESPACE/NAME).
    #[serde(default)]
    pub pod: Option<String>,
    /// Either end is a pod of this namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// `tcp` (connection records) or `http` (requests).
    #[serde(default)]
    pub protocol: Option<String>,
    /// Requests with this response status only.
    #[serde(default)]
    pub status: Option<u16>,
}

impl FlowQuery {
    /// Checks every field; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(n) = self.last
            && !(1..=MAX_RECORDS).contains(&n)
        {
            return Err(format!("last is {n}; it must be 1 to {MAX_RECORDS}"));
        }
        if let Some(p) = &self.protocol
            && p != "tcp"
            && p != "http"
        {
            return Err(format!(
                "protocol {p:?} is not recorded; the choices are: tcp, http"
            ));
        }
        if let Some(s) = self.status
            && !(100..=599).contains(&s)
        {
            return Err(format!("status {s} is not an HTTP status code (100-599)"));
        }
        if let Some(p) = &self.pod {
            crate::types::validate_pod_name(p).map_err(|e| format!("pod: {e}"))?;
        }
        Ok(())
    }

    /// Whether a record passes the filters (not `since`/`last`).
    pub fn matches(&self, r: &FlowRecord) -> bool {
        self.pod.as_deref().is_none_or(|p| r.pods().any(|x| x == p))
            && self.namespace.as_deref().is_none_or(|ns| {
                r.pods()
                    .any(|x| x.split_once('/').is_some_and(|(n, _)| n == ns))
            })
            && self.protocol.as_deref().is_none_or(|p| p == r.protocol)
            && self.status.is_none_or(|s| r.status == Some(s))
    }
}

/// The answer to `flows`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Flows {
    pub records: Vec<FlowRecord>,
    /// Pass as `since` to get what comes after these.
    pub next: u64,
    /// Records after `since` that had already left the agent's buffer (it keeps the newest
    /// [`MAX_RECORDS`]).
    pub missed: u64,
}

/// Telemetry in `meshlane status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TelemetryStatus {
    pub active: bool,
    /// How it works here, or why it is off.
    pub detail: String,
    /// Size of the kernel's event ring buffer in bytes.
    pub ring_bytes: u32,
    /// Events read from it since the agent started.
    pub events: u64,
    /// Events the kernel dropped because the ring was full (since the maps were created).
    pub events_lost: u64,
    /// Observed connections open now (as of the last event read).
    pub open_flows: usize,
    /// Bytes of events in the ring not read yet: how far behind the agent is.
    #[serde(default)]
    pub backlog_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(src: Option<&str>, dst: Option<&str>) -> FlowRecord {
        let end = |pod: Option<&str>| FlowEnd {
            ip: "10.0.0.1".parse().unwrap(),
            port: 80,
            pod: pod.map(str::to_string),
        };
        FlowRecord {
            seq: 1,
            time_ms: 0,
            kind: FlowKind::Open,
            protocol: "tcp".into(),
            reporter: Reporter::Source,
            source: end(src),
            destination: end(dst),
            original_destination: None,
            accelerated: false,
            leg: None,
            method: None,
            path: None,
            status: None,
            duration_ms: None,
            sent_bytes: None,
            sent_redirected_bytes: None,
            received_bytes: None,
            received_redirected_bytes: None,
            srtt_us: None,
            retransmits: None,
        }
    }

    #[test]
    fn filters_match_either_end() {
        let r = record(Some("default/a"), Some("shop/b"));
        let q = |pod: Option<&str>, ns: Option<&str>| FlowQuery {
            pod: pod.map(str::to_string),
            namespace: ns.map(str::to_string),
            ..FlowQuery::default()
        };
        assert!(q(Some("shop/b"), None).matches(&r));
        assert!(q(None, Some("default")).matches(&r));
        assert!(!q(Some("shop/a"), None).matches(&r));
        assert!(!q(None, Some("kube-system")).matches(&r));
        assert!(!q(Some("default/a"), Some("kube-system")).matches(&r));
        assert!(!q(None, Some("default")).matches(&record(None, None)));
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |q: FlowQuery| q.validate().unwrap_err();
        assert!(
            bad(FlowQuery {
                last: Some(0),
                ..FlowQuery::default()
            })
            .starts_with("last")
        );
        assert!(
            bad(FlowQuery {
                protocol: Some("udp".into()),
                ..FlowQuery::default()
            })
            .contains("tcp")
        );
        assert!(
            bad(FlowQuery {
                status: Some(42),
                ..FlowQuery::default()
            })
            .starts_with("status")
        );
        assert!(
            bad(FlowQuery {
                pod: Some("nons".into()),
                ..FlowQuery::default()
            })
            .starts_with("pod")
        );
    }

    #[test]
    fn close_only_fields_are_left_out_of_open_records() {
        let v = serde_json::to_value(record(None, None)).unwrap();
        assert!(v.get("sent_bytes").is_none());
        assert_eq!(v["kind"], "open");
        assert_eq!(v["reporter"], "source");
    }
}
