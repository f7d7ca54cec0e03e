//! Prometheus metrics, read from the maps at scrape time (the kernel counters are the source of
//! truth; nothing is cached in the agent), served on `--metrics-addr`.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use meshlane_api::types::Status;

use crate::agent::Agent;

/// One scrape's snapshot of the agent's status.
#[derive(Debug)]
struct Snapshot(Status);

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = &self.0;
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
    let status = {
        let a = agent
            .lock()
            .map_err(|_| "the agent's state is poisoned".to_string())?;
        a.status()
            .map_err(|e| format!("reading the agent's status: {e}"))?
    };
    let mut r = Registry::default();
    r.register_collector(Box::new(Snapshot(status)));
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
