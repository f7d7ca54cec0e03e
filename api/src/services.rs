//! The services file: a YAML list of virtual addresses and their backends, read by the agent
//! (`--services FILE`) and checked offline by `meshlane services check FILE`. It lives in the API
//! crate because both sides need it: the agent applies a [`ServiceSpec`] table, its clients
//! validate one without an agent (and the controller will send tables of the same type).
//!
//! ```yaml
//! services:
//!   - name: web                # required: a label for status and metrics
//!     vip: 10.96.0.10          # required: IPv4 or IPv6 (quote IPv6 if you like)
//!     port: 80                 # required: 1-65535
//!     protocol: TCP            # TCP (default) or UDP
//!     balance: random          # random (default) or client-address
//!     backends:                # IP:port; IPv6 as "[fd00::1]:8080"; empty = connects refused
//!       - 10.77.0.11:8080
//! ```
//!
//! Parsing keeps every node's line, so every error names the line, the field (as a path like
//! `services[3].backends[1]`) and what was expected. All errors of a file are reported at once,
//! and a file with any error changes nothing.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use dataplane_common::{MAX_BACKENDS_PER_SERVICE, MAX_TOTAL_BACKENDS, SERVICES_CAPACITY};
use serde::{Deserialize, Serialize};
use yaml_rust2::{
    parser::{Event, MarkedEventReceiver, Parser},
    scanner::{Marker, TScalarStyle},
};

/// Larger files are refused before parsing (a 16,384-service table is about 2 MB).
pub const MAX_FILE_BYTES: usize = 16 * 1024 * 1024;
/// At most this many errors are reported; the rest are summarised.
const MAX_ERRORS: usize = 50;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => dataplane_common::IPPROTO_TCP,
            Protocol::Udp => dataplane_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    Random,
    ClientAddress,
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Balance::Random => "random",
            Balance::ClientAddress => "client-address",
        })
    }
}

/// One service: a virtual address and its backends.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceSpec {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub balance: Balance,
    pub backends: Vec<SocketAddr>,
    /// Line of the entry in the file.
    #[serde(skip)]
    pub line: usize,
    /// Position of the entry in the file's list.
    #[serde(skip)]
    pub index: usize,
}

impl ServiceSpec {
    /// `VIP:port/PROTO` as it appears in messages.
    pub fn frontend(&self) -> String {
        format!("{}/{}", SocketAddr::new(self.vip, self.port), self.protocol)
    }
}

/// One problem in a services file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileError {
    pub line: usize,
    pub column: usize,
    /// The field, as a path (`services[3].port`); empty for syntax errors.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}: ", self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// Why a services file was refused: every problem found, in file order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rejected {
    pub errors: Vec<FileError>,
    /// Problems found beyond the ones listed.
    pub more: usize,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        if self.more > 0 {
            write!(f, "\n… and {} more", self.more)?;
        }
        Ok(())
    }
}

impl Rejected {
    fn one(line: usize, column: usize, message: impl Into<String>) -> Self {
        Rejected {
            errors: vec![FileError {
                line,
                column,
                field: String::new(),
                message: message.into(),
            }],
            more: 0,
        }
    }

    /// The report with a file name in front of every line, for logs and the CLI.
    pub fn with_path(&self, path: &Path) -> String {
        self.to_string()
            .lines()
            .map(|l| format!("{}: {l}", path.display()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Reads and parses a services file.
pub fn load(path: &Path) -> Result<Vec<ServiceSpec>, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
        path: path.into(),
        source,
    })?;
    parse_bytes(&bytes).map_err(|rejected| LoadError::Rejected {
        path: path.into(),
        rejected,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading services file {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("services file {} refused, the previous table stays in force:\n{}", path.display(), rejected.with_path(path))]
    Rejected {
        path: std::path::PathBuf,
        rejected: Rejected,
    },
}

/// Parses the bytes of a services file.
pub fn parse_bytes(bytes: &[u8]) -> Result<Vec<ServiceSpec>, Rejected> {
    if bytes.len() > MAX_FILE_BYTES {
        return Err(Rejected::one(
            1,
            1,
            format!(
                "the file is {} bytes; the limit is {MAX_FILE_BYTES}",
                bytes.len()
            ),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let ok = &bytes[..e.valid_up_to()];
        let line = ok.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = ok.len() - ok.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1) + 1;
        Rejected::one(
            line,
            column,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.valid_up_to()
            ),
        )
    })?;
    parse(text)
}

/// Parses the text of a services file.
pub fn parse(text: &str) -> Result<Vec<ServiceSpec>, Rejected> {
    let root = build_tree(text)?;
    let mut v = Validator::default();
    let services = v.file(root.as_ref());
    v.finish(services)
}

// ---------------------------------------------------------------------------------------------
// A YAML tree that remembers where each node is.

#[derive(Debug)]
enum Value {
    Scalar { text: String, quoted: bool },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug)]
struct Node {
    value: Value,
    line: usize,
    column: usize,
}

#[derive(Default)]
struct TreeBuilder {
    /// Open collections: the node being filled and, for mappings, a key waiting for its value.
    stack: Vec<(Node, Option<Node>)>,
    root: Option<Node>,
    documents: usize,
    error: Option<Rejected>,
}

impl TreeBuilder {
    fn push_value(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some((parent, pending_key)) => match &mut parent.value {
                Value::Seq(items) => items.push(node),
                Value::Map(entries) => match pending_key.take() {
                    None => *pending_key = Some(node),
                    Some(k) => entries.push((k, node)),
                },
                Value::Scalar { .. } => unreachable!("scalars are never on the stack"),
            },
        }
    }
}

impl MarkedEventReceiver for TreeBuilder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let at = |value| Node {
            value,
            line: mark.line(),
            column: mark.col() + 1,
        };
        match ev {
            Event::DocumentStart => {
                self.documents += 1;
                if self.documents > 1 {
                    self.error = Some(Rejected::one(
                        mark.line(),
                        mark.col() + 1,
                        "a services file holds one YAML document",
                    ));
                }
            }
            Event::Alias(_) => {
                self.error = Some(Rejected::one(
                    mark.line(),
                    mark.col() + 1,
                    "YAML aliases are not supported in services files",
                ));
            }
            Event::Scalar(text, style, _, _) => {
                let quoted = !matches!(style, TScalarStyle::Plain);
                self.push_value(at(Value::Scalar { text, quoted }));
            }
            Event::SequenceStart(..) => self.stack.push((at(Value::Seq(Vec::new())), None)),
            Event::MappingStart(..) => self.stack.push((at(Value::Map(Vec::new())), None)),
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((node, _)) = self.stack.pop() {
                    self.push_value(node);
                }
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

fn build_tree(text: &str) -> Result<Option<Node>, Rejected> {
    let mut b = TreeBuilder::default();
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut b, true) {
        let m = e.marker();
        return Err(Rejected::one(
            m.line(),
            m.col() + 1,
            format!("not valid YAML: {}", e.info()),
        ));
    }
    if let Some(e) = b.error {
        return Err(e);
    }
    Ok(b.root)
}

// ---------------------------------------------------------------------------------------------
// From the tree to services, collecting every error.

#[derive(Default)]
struct Validator {
    errors: Vec<FileError>,
}

impl Validator {
    fn err(&mut self, node: &Node, field: &str, message: impl Into<String>) {
        self.errors.push(FileError {
            line: node.line,
            column: node.column,
            field: field.into(),
            message: message.into(),
        });
    }

    fn finish(mut self, services: Vec<ServiceSpec>) -> Result<Vec<ServiceSpec>, Rejected> {
        if self.errors.is_empty() {
            return Ok(services);
        }
        self.errors.sort_by_key(|e| (e.line, e.column));
        let more = self.errors.len().saturating_sub(MAX_ERRORS);
        self.errors.truncate(MAX_ERRORS);
        Err(Rejected {
            errors: self.errors,
            more,
        })
    }

    /// The entries of a mapping, refusing keys other than `allowed` and duplicate keys.
    fn fields<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        allowed: &[&str],
    ) -> Option<HashMap<&'n str, &'n Node>> {
        let Value::Map(entries) = &node.value else {
            self.err(
                node,
                path,
                format!(
                    "expected a mapping with {}, found {}",
                    allowed.join(", "),
                    describe(node)
                ),
            );
            return None;
        };
        let mut out = HashMap::new();
        for (k, v) in entries {
            let Value::Scalar { text, .. } = &k.value else {
                self.err(k, path, "keys must be plain names");
                continue;
            };
            let field = join(path, text);
            if !allowed.contains(&text.as_str()) {
                self.err(
                    k,
                    &field,
                    format!("unknown field; expected one of {}", allowed.join(", ")),
                );
            } else if out.insert(text.as_str(), v).is_some() {
                self.err(k, &field, "given twice");
            }
        }
        Some(out)
    }

    fn file(&mut self, root: Option<&Node>) -> Vec<ServiceSpec> {
        // An empty file is an empty table.
        let Some(root) = root else {
            return Vec::new();
        };
        if matches!(&root.value, Value::Scalar { text, quoted: false } if text.is_empty() || text == "~" || text == "null")
        {
            return Vec::new();
        }
        let Some(top) = self.fields(root, "", &["services"]) else {
            return Vec::new();
        };
        let Some(list) = top.get("services") else {
            self.err(root, "services", "missing; expected a list of services");
            return Vec::new();
        };
        let items = match &list.value {
            Value::Seq(items) => items,
            Value::Scalar {
                text,
                quoted: false,
            } if text.is_empty() || text == "~" || text == "null" => {
                return Vec::new();
            }
            _ => {
                self.err(
                    list,
                    "services",
                    format!("expected a list, found {}", describe(list)),
                );
                return Vec::new();
            }
        };
        if items.len() > SERVICES_CAPACITY as usize {
            self.err(
                list,
                "services",
                format!(
                    "{} services; this agent holds at most {SERVICES_CAPACITY}",
                    items.len()
                ),
            );
        }
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            if let Some(s) = self.service(item, i) {
                out.push(s);
            }
        }
        self.cross_checks(&out);
        out
    }

    fn service(&mut self, node: &Node, index: usize) -> Option<ServiceSpec> {
        const FIELDS: &[&str] = &["name", "vip", "port", "protocol", "balance", "backends"];
        let path = &format!("services[{index}]");
        let f = self.fields(node, path, FIELDS)?;
        let before = self.errors.len();
        // "missing" points at the entry's first key (a mapping's own mark is after it).
        let anchor = match &node.value {
            Value::Map(entries) if !entries.is_empty() => &entries[0].0,
            _ => node,
        };
        let required = |v: &mut Self, key: &str| -> Option<&Node> {
            let n = f.get(key).copied();
            if n.is_none() {
                v.err(anchor, &join(path, key), "missing");
            }
            n
        };
        let name = required(self, "name").and_then(|n| self.name(n, &join(path, "name")));
        let vip = required(self, "vip").and_then(|n| self.vip(n, &join(path, "vip")));
        let port = required(self, "port").and_then(|n| self.port(n, &join(path, "port")));
        let protocol = match f.get("protocol") {
            None => Some(Protocol::Tcp),
            Some(n) => self.protocol(n, &join(path, "protocol")),
        };
        let balance = match f.get("balance") {
            None => Some(Balance::Random),
            Some(n) => self.balance(n, &join(path, "balance")),
        };
        let backends = match f.get("backends") {
            None => Some(Vec::new()),
            Some(n) => self.backends(n, &join(path, "backends"), vip),
        };
        if self.errors.len() != before {
            return None;
        }
        Some(ServiceSpec {
            name: name?,
            vip: vip?,
            port: port?,
            protocol: protocol?,
            balance: balance?,
            backends: backends?,
            line: anchor.line,
            index,
        })
    }

    fn scalar<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        expected: &str,
    ) -> Option<(&'n str, bool)> {
        match &node.value {
            Value::Scalar { text, quoted } => Some((text.as_str(), *quoted)),
            _ => {
                self.err(
                    node,
                    path,
                    format!("expected {expected}, found {}", describe(node)),
                );
                None
            }
        }
    }

    fn name(&mut self, node: &Node, path: &str) -> Option<String> {
        let (s, _) = self.scalar(node, path, "a name")?;
        let ok = !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'/'));
        if !ok {
            self.err(
                node,
                path,
                format!("{s:?} is not a name: use 1-253 letters, digits, '-', '.', '_' or '/'"),
            );
            return None;
        }
        Some(s.to_owned())
    }

    fn vip(&mut self, node: &Node, path: &str) -> Option<IpAddr> {
        let (s, _) = self.scalar(node, path, "an IP address")?;
        let ip: IpAddr = match s.parse() {
            Ok(ip) => ip,
            Err(_) => {
                self.err(
                    node,
                    path,
                    format!("{s:?} is not an IP address (like 10.96.0.10 or fd00::10)"),
                );
                return None;
            }
        };
        let bad = match ip {
            IpAddr::V4(v4) => {
                v4.is_unspecified() || v4.is_loopback() || v4.is_multicast() || v4.is_broadcast()
            }
            IpAddr::V6(v6) => {
                v6.is_unspecified()
                    || v6.is_loopback()
                    || v6.is_multicast()
                    || v6.to_ipv4_mapped().is_some()
            }
        };
        if bad {
            self.err(
                node,
                path,
                format!("{ip} cannot be a service address (unspecified, loopback, multicast, broadcast and IPv4-mapped addresses are refused)"),
            );
            return None;
        }
        Some(ip)
    }

    fn port(&mut self, node: &Node, path: &str) -> Option<u16> {
        let (s, quoted) = self.scalar(node, path, "an integer 1-65535")?;
        match s.parse::<u16>() {
            Ok(p) if p > 0 && !quoted => Some(p),
            _ => {
                let found = if quoted {
                    format!("the string {s:?}")
                } else {
                    format!("{s:?}")
                };
                self.err(
                    node,
                    path,
                    format!("expected an integer 1-65535, found {found}"),
                );
                None
            }
        }
    }

    fn protocol(&mut self, node: &Node, path: &str) -> Option<Protocol> {
        let (s, _) = self.scalar(node, path, "TCP or UDP")?;
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            _ => {
                self.err(
                    node,
                    path,
                    format!("unknown protocol {s:?}; expected TCP or UDP"),
                );
                None
            }
        }
    }

    fn balance(&mut self, node: &Node, path: &str) -> Option<Balance> {
        let (s, _) = self.scalar(node, path, "random or client-address")?;
        match s {
            "random" => Some(Balance::Random),
            "client-address" => Some(Balance::ClientAddress),
            _ => {
                self.err(
                    node,
                    path,
                    format!("unknown balance {s:?}; expected random or client-address"),
                );
                None
            }
        }
    }

    fn backends(
        &mut self,
        node: &Node,
        path: &str,
        vip: Option<IpAddr>,
    ) -> Option<Vec<SocketAddr>> {
        let items = match &node.value {
            Value::Seq(items) => items,
            Value::Scalar {
                text,
                quoted: false,
            } if text.is_empty() || text == "~" || text == "null" => {
                return Some(Vec::new());
            }
            _ => {
                self.err(
                    node,
                    path,
                    format!("expected a list of IP:port, found {}", describe(node)),
                );
                return None;
            }
        };
        if items.len() > MAX_BACKENDS_PER_SERVICE as usize {
            self.err(
                node,
                path,
                format!(
                    "{} backends; a service has at most {MAX_BACKENDS_PER_SERVICE}",
                    items.len()
                ),
            );
            return None;
        }
        let mut out = Vec::with_capacity(items.len());
        let mut seen = BTreeSet::new();
        for (j, item) in items.iter().enumerate() {
            let p = format!("{path}[{j}]");
            let Some((s, _)) = self.scalar(item, &p, "IP:port") else {
                continue;
            };
            let addr: SocketAddr = match s.parse() {
                Ok(a) => a,
                Err(_) => {
                    self.err(
                        item,
                        &p,
                        format!("{s:?} is not an address; expected IP:port such as 10.77.0.11:8080 or \"[fd77::11]:8080\""),
                    );
                    continue;
                }
            };
            if addr.port() == 0 {
                self.err(item, &p, format!("{s:?} has port 0; expected 1-65535"));
                continue;
            }
            let ip = addr.ip();
            if ip.is_unspecified() || ip.is_multicast() {
                self.err(item, &p, format!("{s:?} is not a unicast address"));
                continue;
            }
            if let Some(vip) = vip
                && vip.is_ipv4() != ip.is_ipv4()
            {
                self.err(
                    item,
                    &p,
                    format!("{s:?} is {} but the VIP {vip} is {}; a service's backends have its VIP's family",
                        family(&ip), family(&vip)),
                );
                continue;
            }
            if !seen.insert(addr) {
                self.err(item, &p, format!("{s:?} is listed twice"));
                continue;
            }
            out.push(addr);
        }
        Some(out)
    }

    /// Checks across services: one entry per VIP:port/protocol, and the total backend count.
    fn cross_checks(&mut self, services: &[ServiceSpec]) {
        let mut first: HashMap<(IpAddr, u16, Protocol), &ServiceSpec> = HashMap::new();
        let mut total = 0usize;
        for s in services {
            total += s.backends.len();
            if let Some(earlier) = first.get(&(s.vip, s.port, s.protocol)) {
                self.errors.push(FileError {
                    line: s.line,
                    column: 1,
                    field: format!("services[{}]", s.index),
                    message: format!(
                        "duplicate VIP: {} is already defined by services[{}] ({:?}, line {})",
                        s.frontend(),
                        earlier.index,
                        earlier.name,
                        earlier.line
                    ),
                });
            } else {
                first.insert((s.vip, s.port, s.protocol), s);
            }
        }
        if total > MAX_TOTAL_BACKENDS as usize {
            self.errors.push(FileError {
                line: 1,
                column: 1,
                field: "services".into(),
                message: format!(
                    "{total} backends in all; this agent holds at most {MAX_TOTAL_BACKENDS}"
                ),
            });
        }
    }
}

fn family(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn describe(node: &Node) -> String {
    match &node.value {
        Value::Scalar { text, .. } if text.len() > 40 => format!(
            "{:?}…",
            &text[..text.char_indices().nth(40).map_or(text.len(), |(i, _)| i)]
        ),
        Value::Scalar { text, .. } => format!("{text:?}"),
        Value::Seq(_) => "a list".into(),
        Value::Map(_) => "a mapping".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_file_parses_with_defaults() {
        let t = parse(
            "services:\n  - name: web\n    vip: 10.96.0.10\n    port: 80\n    balance: client-address\n    backends: [10.0.0.1:8080, 10.0.0.2:8080]\n",
        )
        .unwrap();
        assert_eq!(t[0].backends.len(), 2);
        assert_eq!((t[0].line, t[0].balance), (2, Balance::ClientAddress));
        let t =
            parse("services:\n  - name: web\n    vip: fd96::10\n    port: 80\n    protocol: udp\n")
                .unwrap();
        assert_eq!(t[0].protocol, Protocol::Udp);
        assert_eq!(t[0].balance, Balance::Random);
        assert!(t[0].backends.is_empty());
        assert_eq!(t[0].frontend(), "[fd96::10]:80/UDP");
    }

    #[test]
    fn empty_files_are_empty_tables() {
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(parse("services: []\n").unwrap(), vec![]);
        assert_eq!(parse("services:\n").unwrap(), vec![]);
    }

    #[test]
    fn every_error_is_reported_with_its_line_and_field() {
        let e = parse(
            "services:\n  - name: a\n    vip: 10.96.0.1\n    port: 0\n    extra: 1\n  - vip: nope\n    port: \"80\"\n",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "line 4, column 11: services[0].port: expected an integer 1-65535, found \"0\"",
            "line 5, column 5: services[0].extra: unknown field",
            "line 6, column 5: services[1].name: missing",
            "line 6, column 10: services[1].vip: \"nope\" is not an IP address",
            "line 7, column 11: services[1].port: expected an integer 1-65535, found the string \"80\"",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
    }

    #[test]
    fn syntax_errors_and_non_utf8_name_their_place() {
        let e = parse("services:\n  - name: [unclosed\n").unwrap_err();
        assert!(e.errors[0].message.starts_with("not valid YAML"), "{e}");
        let e = parse_bytes(b"services:\n  - name: \xff\n").unwrap_err();
        assert_eq!((e.errors[0].line, e.errors[0].column), (2, 11), "{e}");
        let e = parse("services:\n  - &a {name: x}\n  - *a\n").unwrap_err();
        assert!(e.to_string().contains("aliases"), "{e}");
    }

    #[test]
    fn families_must_match_and_backends_are_unique() {
        let e = parse(
            "services:\n  - name: a\n    vip: 10.96.0.1\n    port: 80\n    backends: [\"[fd00::1]:80\", 10.0.0.1:80, 10.0.0.1:80]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("is IPv6 but the VIP 10.96.0.1 is IPv4"), "{e}");
        assert!(e.contains("\"10.0.0.1:80\" is listed twice"), "{e}");
    }
}
