//! Prometheus metrics, read from the maps at scrape time (the kernel counters are the source of
//! truth; nothing is cached in the agent), served on `--metrics-addr`.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use meshlane_api::types::Status;

use crate::{
    agent::Agent,
    telemetry::{HTTP_BUCKETS, Labels, RTT_BUCKETS, Series, Totals},
};

/// One scrape's snapshot of the agent's status and telemetry.
#[derive(Debug)]
struct Snapshot {
    status: Status,
    flows: BTreeMap<Labels, Series>,
    /// Label sets not kept (the cap was hit) and connections whose close never arrived.
    losses: (u64, u64),
}

/// The L4 flow series (see the README's table for what each means).
fn encode_flows(
    flows: &BTreeMap<Labels, Series>,
    losses: (u64, u64),
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    use prometheus_client::metrics::MetricType;
    for (name, help, dir) in [
        (
            "meshlane_tcp_sent_bytes",
            "Bytes the reporter's application wrote on TCP connections, by path (redirected socket to socket, or through the stack)",
            true,
        ),
        (
            "meshlane_tcp_received_bytes",
            "Bytes the reporter's application read on TCP connections, by path",
            false,
        ),
    ] {
        let mut e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (l, s) in flows {
            for (path, v) in if dir {
                [
                    ("redirected", s.bytes.sent_redirected),
                    ("stack", s.bytes.sent_stack),
                ]
            } else {
                [
                    ("redirected", s.bytes.received_redirected),
                    ("stack", s.bytes.received_stack),
                ]
            } {
                let mut labels = l.pairs().to_vec();
                labels.push(("path", path));
                ConstCounter::new(v).encode(e.encode_family(&labels)?)?;
            }
        }
    }
    type Field = fn(&Totals) -> u64;
    let counters: [(&str, &str, Field); 3] = [
        (
            "meshlane_tcp_connections_opened",
            "TCP connections established, as the reporter saw them",
            |t| t.opened,
        ),
        (
            "meshlane_tcp_connections_closed",
            "TCP connections ended (socket destroyed after the application's last read)",
            |t| t.closed,
        ),
        (
            "meshlane_tcp_retransmits",
            "Segments the reporter's TCP retransmitted, counted when the connection closes",
            |t| t.retransmits,
        ),
    ];
    for (name, help, get) in counters {
        let mut e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (l, s) in flows {
            ConstCounter::new(get(&s.totals)).encode(e.encode_family(&l.pairs())?)?;
        }
    }
    let mut e = encoder.encode_descriptor(
        "meshlane_tcp_rtt_seconds",
        "Smoothed RTT of closed TCP connections that carried data through the stack, one observation per connection",
        None,
        MetricType::Histogram,
    )?;
    for (l, s) in flows {
        let t = &s.totals;
        let mut buckets: Vec<(f64, u64)> = RTT_BUCKETS
            .iter()
            .enumerate()
            .map(|(i, b)| (*b, t.rtt_buckets.get(i).copied().unwrap_or(0)))
            .collect();
        buckets.push((
            f64::MAX,
            t.rtt_buckets.get(RTT_BUCKETS.len()).copied().unwrap_or(0),
        ));
        e.encode_family(&l.pairs())?
            .encode_histogram::<NoLabelSet>(t.rtt_sum, t.rtt_count, &buckets, None)?;
    }
    for (server, name, help) in [
        (
            true,
            "http_server_request_duration_seconds",
            "Duration of HTTP requests as the server's socket saw them: request's first byte read → response's last byte written",
        ),
        (
            false,
            "http_client_request_duration_seconds",
            "Duration of HTTP requests as the client's socket saw them: request's first byte written → response's last byte read",
        ),
    ] {
        let mut e = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (l, s) in flows {
            for h in s.totals.http.iter().filter(|h| h.server == server) {
                let status = h.status.to_string();
                let labels = [
                    ("source_workload", l.source_workload.as_str()),
                    ("source_namespace", l.source_namespace.as_str()),
                    ("destination_workload", l.destination_workload.as_str()),
                    ("destination_namespace", l.destination_namespace.as_str()),
                    ("destination_service", "unknown"),
                    ("http_request_method", h.method.as_str()),
                    ("http_response_status_code", status.as_str()),
                ];
                let d = &h.duration;
                let mut buckets: Vec<(f64, u64)> = HTTP_BUCKETS
                    .iter()
                    .enumerate()
                    .map(|(i, b)| (*b, d.buckets.get(i).copied().unwrap_or(0)))
                    .collect();
                buckets.push((
                    f64::MAX,
                    d.buckets.get(HTTP_BUCKETS.len()).copied().unwrap_or(0),
                ));
                e.encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(d.sum, d.count, &buckets, None)?;
            }
        }
    }
    let mut e = encoder.encode_descriptor(
        "meshlane_http_unparsed",
        "Places in observed TCP streams where an HTTP message had to start but what was there did not parse, or was not seen: never counted as requests",
        None,
        MetricType::Counter,
    )?;
    for (l, s) in flows {
        if s.totals.http_unparsed > 0 {
            ConstCounter::new(s.totals.http_unparsed).encode(e.encode_family(&l.pairs())?)?;
        }
    }
    for (name, help, v) in [
        (
            "meshlane_telemetry_series_dropped",
            "Connections counted under the _overflow label set because the label-set cap was reached",
            losses.0,
        ),
        (
            "meshlane_telemetry_flows_lost",
            "Connections whose close event never arrived (the ring was full): counted closed with their last bytes read",
            losses.1,
        ),
    ] {
        let e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        ConstCounter::new(v).encode(e)?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode_flows(&self.flows, self.losses, &mut encoder)?;
        let status = &self.status;
        let counters = encoder.encode_descriptor(
            "meshlane_dataplane_events",
            "Dataplane events by reason (sockets inserted, messages redirected, passes to the stack by cause)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        let mut counters = counters;
        for (name, v) in &status.counters {
            let labels = [("reason", name.as_str())];
            ConstCounter::new(*v).encode(counters.encode_family(&labels)?)?;
        }
        for (name, help, v) in [
            (
                "meshlane_accelerate",
                "1 when redirect is on",
                status.accelerate as i64,
            ),
            (
                "meshlane_selftest_passed",
                "1 when the start-up self-test passed",
                status.selftest.passed as i64,
            ),
            ("meshlane_pods", "Enrolled pods", status.pods as i64),
            (
                "meshlane_sockhash_sockets",
                "Sockets in the SOCKHASH",
                status.sockhash_sockets as i64,
            ),
        ] {
            let g = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            ConstGauge::new(v).encode(g)?;
        }
        Ok(())
    }
}

/// The exposition text of one scrape, read from the maps now; or why it cannot be produced.
pub fn render(agent: &Mutex<Agent>) -> Result<String, String> {
    let snapshot = {
        let mut a = agent
            .lock()
            .map_err(|_| "the agent's state is poisoned".to_string())?;
        a.drain_telemetry();
        let status = a
            .status()
            .map_err(|e| format!("reading the agent's status: {e}"))?;
        let flows = a
            .flow_series()
            .map_err(|e| format!("reading the open flows: {e}"))?;
        Snapshot {
            status,
            flows,
            losses: a.telemetry.losses(),
        }
    };
    let mut r = Registry::default();
    r.register_collector(Box::new(snapshot));
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, &r)
        .map_err(|e| format!("encoding the metrics: {e}"))?;
    Ok(body)
}

/// A deliberately small HTTP/1.1 responder: `GET /metrics` gets the exposition, anything else a
/// 404. One request per connection.
pub async fn serve(listener: tokio::net::TcpListener, agent: Arc<Mutex<Agent>>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while n < buf.len() {
                    let m = sock.read(&mut buf[n..]).await?;
                    if m == 0 {
                        break;
                    }
                    n += m;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if head.starts_with("GET /metrics ") {
                match tokio::task::spawn_blocking(move || render(&agent)).await {
                    Ok(Ok(body)) => ("200 OK", body),
                    Ok(Err(why)) => {
                        tracing::error!("metrics scrape failed: {why}");
                        ("500 Internal Server Error", format!("{why}\n"))
                    }
                    Err(e) => {
                        tracing::error!("metrics scrape failed: {e}");
                        ("500 Internal Server Error", format!("{e}\n"))
                    }
                }
            } else {
                ("404 Not Found", "only /metrics is served here\n".into())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _client_may_have_gone = sock.write_all(resp.as_bytes()).await;
        });
    }
}
