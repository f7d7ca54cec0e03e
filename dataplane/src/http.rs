//! HTTP/1.x from one socket's payload records: finds each message in the two byte streams
//! (what the application wrote and what it read), frames its body, and pairs requests with
//! responses in order, so keep-alive, pipelining (up to [`MAX_OUTSTANDING`] requests),
//! `Connection: close`, chunked and fixed-length bodies, `100 Continue`, `HEAD` and
//! 1xx/204/304 responses are each counted once.
//!
//! The kernel copies at most `DATA_CAPTURE` bytes of a read or write, starting where this parser
//! said the next message begins ([`Conn::next`]); the header lines are parsed by `httparse`.
//! Anything that does not parse, or a stream whose bytes were not all seen where a message had
//! to start, is counted as unparsed and never as a request; the stream resynchronises at the
//! next call that starts with a request or status line.
//!
//! Pure logic, no I/O: the agent feeds it records and reads exchanges out.

use std::collections::VecDeque;

/// Requests waiting for their responses on one connection, at most.
pub const MAX_OUTSTANDING: usize = 32;
/// Longest header block accepted; a longer one is unparsed.
pub const MAX_HEADER: usize = 64 * 1024;

/// Which end of the connection this socket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// It connected: it writes requests and reads responses.
    Client,
    /// It accepted: it reads requests and writes responses.
    Server,
}

/// Which of the socket's two streams a record is from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    Write = 0,
    Read = 1,
}

/// One payload record.
#[derive(Clone, Copy, Debug)]
pub struct Chunk<'a> {
    pub dir: Dir,
    /// Stream offset of `data[0]`.
    pub offset: u64,
    /// Stream offset after the call.
    pub end: u64,
    pub data: &'a [u8],
    pub at_ns: u64,
}

/// A request and its response, as this socket saw them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    pub method: String,
    /// The request target as sent (for `meshlane observe`, never a metric label).
    pub path: String,
    pub status: u16,
    /// Server: request's first byte read → response's last byte written. Client: request's
    /// first byte written → response's last byte read.
    pub duration_ns: u64,
}

/// What a record produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Exchange(Exchange),
    /// Bytes where a message had to start did not parse (or were not seen): not counted as
    /// HTTP.
    Unparsed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Mode {
    /// A message starts at `expect`; `buf` holds its first bytes seen so far.
    Start,
    /// Body bytes up to (not including) this offset.
    Body { end: u64 },
    /// A chunked body: the next chunk-size line starts at `expect`.
    ChunkSize,
    /// Chunk data (and its CRLF) up to this offset; then the next size line.
    ChunkData { end: u64 },
    /// After the last chunk: trailer lines until an empty one, from `expect`.
    Trailers,
    /// The response body runs until the connection closes.
    UntilClose,
    /// Not HTTP (the first bytes did not parse): nothing more is looked at.
    Off,
    /// Lost track: waiting for a call that starts with a request or status line.
    Lost,
}

#[derive(Clone, Debug)]
struct Stream {
    expect: u64,
    buf: Vec<u8>,
    /// When the message being read started (the record that held its first byte).
    started_ns: u64,
    mode: Mode,
    /// Messages found on this stream so far.
    messages: u64,
    /// Calls seen while [`Mode::Lost`] on a stream joined midway (see [`Conn::joined`]).
    searched: u32,
}

impl Stream {
    fn new() -> Stream {
        Stream {
            expect: 0,
            buf: Vec::new(),
            started_ns: 0,
            mode: Mode::Start,
            messages: 0,
            searched: 0,
        }
    }
}

/// Calls a stream joined midway may take to show a message start before it is taken for
/// something other than HTTP (and no longer copied).
const JOIN_SEARCH: u32 = 64;

#[derive(Clone, Debug)]
struct Pending {
    method: String,
    path: String,
    started_ns: u64,
}

/// A response whose header was parsed and whose body is still being read.
#[derive(Clone, Debug)]
struct Open {
    method: String,
    path: String,
    status: u16,
    request_ns: u64,
}

/// One socket's HTTP state.
#[derive(Clone, Debug)]
pub struct Conn {
    role: Role,
    streams: [Stream; 2],
    requests: VecDeque<Pending>,
    /// The response being read or written (header seen, body not finished).
    response: Option<Open>,
}

/// Request methods kept as they are in metrics (OpenTelemetry's list); others are `_OTHER`.
pub fn method_label(m: &str) -> &str {
    match m {
        "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE" | "PATCH" => m,
        _ => "_OTHER",
    }
}

/// Whether bytes look like the start of an HTTP/1 message (a method token and a space, or
/// `HTTP/1.`): where a lost stream may pick up again.
fn starts_message(b: &[u8], requests: bool) -> bool {
    if requests {
        let token = b
            .iter()
            .take(16)
            .take_while(|c| c.is_ascii_uppercase())
            .count();
        token > 0 && b.get(token) == Some(&b' ')
    } else {
        b.starts_with(b"HTTP/1.")
    }
}

enum Head {
    Request {
        method: String,
        path: String,
        body: Body,
    },
    Response {
        status: u16,
        body: Body,
    },
}

#[derive(Clone, Copy)]
enum Body {
    Length(u64),
    Chunked,
    UntilClose,
}

/// Body framing from the headers (RFC 9112 §6): chunked wins over a length.
fn framing(headers: &[httparse::Header<'_>]) -> Result<Option<Body>, ()> {
    let mut length = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let v = std::str::from_utf8(h.value).map_err(|_| ())?;
            if v.rsplit(',')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
            {
                return Ok(Some(Body::Chunked));
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value).map_err(|_| ())?.trim();
            let n: u64 = v.parse().map_err(|_| ())?;
            if length.is_some_and(|l| l != n) {
                return Err(());
            }
            length = Some(n);
        }
    }
    Ok(length.map(Body::Length))
}

/// Parses a header block; `Ok(None)`: incomplete.
fn parse_head(buf: &[u8], requests: bool) -> Result<Option<(usize, Head)>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    if requests {
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                let method = req.method.ok_or(())?.to_string();
                let path = req.path.unwrap_or("").chars().take(256).collect();
                let body = framing(req.headers)?.unwrap_or(Body::Length(0));
                Ok(Some((n, Head::Request { method, path, body })))
            }
            Ok(httparse::Status::Partial) => Ok(None),
            Err(_) => Err(()),
        }
    } else {
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                let status = resp.code.ok_or(())?;
                let body = framing(resp.headers)?.unwrap_or(Body::UntilClose);
                Ok(Some((n, Head::Response { status, body })))
            }
            Ok(httparse::Status::Partial) => Ok(None),
            Err(_) => Err(()),
        }
    }
}

impl Conn {
    pub fn new(role: Role) -> Conn {
        Conn {
            role,
            streams: [Stream::new(), Stream::new()],
            requests: VecDeque::new(),
            response: None,
        }
    }

    /// A connection whose first bytes were moved before this parser existed (it was open
    /// when the agent started): both streams look for the next call that starts with a
    /// request or status line, and give up (not HTTP) after [`JOIN_SEARCH`] calls without one.
    pub fn joined(role: Role) -> Conn {
        let mut c = Conn::new(role);
        for s in &mut c.streams {
            s.mode = Mode::Lost;
            s.searched = 1;
        }
        c
    }

    fn carries_requests(&self, dir: Dir) -> bool {
        matches!(
            (self.role, dir),
            (Role::Client, Dir::Write) | (Role::Server, Dir::Read)
        )
    }

    /// Where the kernel should start copying next, per direction (`u64::MAX`: nothing more).
    pub fn next(&self) -> [u64; 2] {
        let one = |s: &Stream| match s.mode {
            Mode::Off => u64::MAX,
            Mode::Body { end } | Mode::ChunkData { end } => end,
            // Lost: copy every call from its start, to find the next message.
            Mode::Lost => 0,
            Mode::UntilClose => u64::MAX,
            Mode::Start | Mode::ChunkSize | Mode::Trailers => s.expect + s.buf.len() as u64,
        };
        [one(&self.streams[0]), one(&self.streams[1])]
    }

    /// Feeds one record; what it completed goes to `out`.
    pub fn feed(&mut self, c: Chunk<'_>, out: &mut Vec<Event>) {
        let requests = self.carries_requests(c.dir);
        let d = c.dir as usize;
        // Bound the work per record: each turn consumes a message or a chunk line.
        for _ in 0..4 * MAX_OUTSTANDING {
            let s = &mut self.streams[d];
            match s.mode.clone() {
                Mode::Off | Mode::UntilClose => return,
                Mode::Body { end } | Mode::ChunkData { end } => {
                    if c.end < end {
                        return;
                    }
                    s.expect = end;
                    s.buf.clear();
                    if matches!(s.mode, Mode::Body { .. }) {
                        s.mode = Mode::Start;
                        self.finish(requests, c.at_ns, out);
                    } else {
                        s.mode = Mode::ChunkSize;
                    }
                }
                Mode::Lost => {
                    let Some(at) = c.data.first().map(|_| c.offset) else {
                        return;
                    };
                    if !starts_message(c.data, requests) {
                        if s.searched > 0 {
                            s.searched += 1;
                            if s.searched > JOIN_SEARCH {
                                s.mode = Mode::Off;
                            }
                        }
                        return;
                    }
                    s.searched = 0;
                    s.expect = at;
                    s.buf.clear();
                    s.mode = Mode::Start;
                    // Requests whose responses were lost with the stream are not paired.
                    if requests {
                        self.requests.clear();
                    } else {
                        self.response = None;
                    }
                }
                Mode::Start | Mode::ChunkSize | Mode::Trailers => {
                    let need = s.expect + s.buf.len() as u64;
                    if need >= c.end {
                        return;
                    }
                    let seen_to = c.offset + c.data.len() as u64;
                    if need < c.offset || need >= seen_to {
                        // Bytes where the message continues were not copied.
                        self.lose(d, out);
                        return;
                    }
                    let s = &mut self.streams[d];
                    if s.buf.is_empty() && s.mode == Mode::Start {
                        s.started_ns = c.at_ns;
                    }
                    let take = &c.data[(need - c.offset) as usize..];
                    let room = MAX_HEADER.saturating_sub(s.buf.len());
                    s.buf.extend_from_slice(&take[..take.len().min(room)]);
                    if !self.advance(d, requests, c, out) {
                        // Still inside a header or chunk line, but the call moved bytes past
                        // what was copied: the rest of it was never seen.
                        let s = &self.streams[d];
                        let waiting =
                            matches!(s.mode, Mode::Start | Mode::ChunkSize | Mode::Trailers);
                        if waiting && seen_to < c.end {
                            self.lose(d, out);
                        }
                        return;
                    }
                }
            }
        }
    }

    /// Tries to complete what starts at `expect` from `buf`; returns whether it made progress.
    fn advance(&mut self, d: usize, requests: bool, c: Chunk<'_>, out: &mut Vec<Event>) -> bool {
        let s = &mut self.streams[d];
        match s.mode {
            Mode::Start => match parse_head(&s.buf, requests) {
                Err(()) => {
                    self.lose(d, out);
                    false
                }
                Ok(None) => {
                    if s.buf.len() >= MAX_HEADER {
                        self.lose(d, out);
                    }
                    false
                }
                Ok(Some((n, head))) => {
                    s.messages += 1;
                    let start = s.expect;
                    let started_ns = s.started_ns;
                    let body = match head {
                        Head::Request { method, path, body } => {
                            if self.requests.len() >= MAX_OUTSTANDING {
                                self.requests.pop_front();
                                out.push(Event::Unparsed);
                            }
                            self.requests.push_back(Pending {
                                method,
                                path,
                                started_ns,
                            });
                            body
                        }
                        Head::Response { status, body } => {
                            if (100..200).contains(&status) && status != 101 {
                                // An interim response: the final one follows.
                                Body::Length(0)
                            } else {
                                match self.requests.pop_front() {
                                    Some(req) => {
                                        let no_body =
                                            req.method == "HEAD" || status == 204 || status == 304;
                                        self.response = Some(Open {
                                            method: req.method,
                                            path: req.path,
                                            status,
                                            request_ns: req.started_ns,
                                        });
                                        if no_body { Body::Length(0) } else { body }
                                    }
                                    // A response nobody asked for (its request was not seen).
                                    None => {
                                        out.push(Event::Unparsed);
                                        body
                                    }
                                }
                            }
                        }
                    };
                    let s = &mut self.streams[d];
                    let head_end = start + n as u64;
                    s.buf.clear();
                    match body {
                        Body::Length(len) => {
                            s.expect = head_end;
                            s.mode = Mode::Body {
                                end: head_end + len,
                            };
                        }
                        Body::Chunked => {
                            s.expect = head_end;
                            s.mode = Mode::ChunkSize;
                        }
                        Body::UntilClose => {
                            s.expect = head_end;
                            s.mode = Mode::UntilClose;
                        }
                    }
                    let _ = c;
                    true
                }
            },
            Mode::ChunkSize => {
                let Some(eol) = s.buf.windows(2).position(|w| w == b"\r\n") else {
                    if s.buf.len() > 1024 {
                        self.lose(d, out);
                    }
                    return false;
                };
                let line = &s.buf[..eol];
                let hex = line.split(|b| *b == b';').next().unwrap_or(b"");
                let size = std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u64::from_str_radix(h.trim(), 16).ok());
                let Some(size) = size else {
                    self.lose(d, out);
                    return false;
                };
                let after = s.expect + eol as u64 + 2;
                s.buf.clear();
                if size == 0 {
                    s.expect = after;
                    s.mode = Mode::Trailers;
                } else {
                    s.expect = after;
                    s.mode = Mode::ChunkData {
                        end: after + size + 2,
                    };
                }
                true
            }
            Mode::Trailers => {
                // Trailer lines until an empty one; usually just the CRLF.
                let mut at = 0;
                loop {
                    let Some(eol) = s.buf[at..].windows(2).position(|w| w == b"\r\n") else {
                        if s.buf.len() > MAX_HEADER {
                            self.lose(d, out);
                        }
                        return false;
                    };
                    if eol == 0 {
                        s.expect += (at + 2) as u64;
                        s.buf.clear();
                        s.mode = Mode::Start;
                        self.finish(requests, c.at_ns, out);
                        return true;
                    }
                    at += eol + 2;
                }
            }
            _ => false,
        }
    }

    /// A message's last byte moved at `at_ns`.
    fn finish(&mut self, requests: bool, at_ns: u64, out: &mut Vec<Event>) {
        if requests {
            return;
        }
        if let Some(r) = self.response.take() {
            out.push(Event::Exchange(Exchange {
                method: r.method,
                path: r.path,
                status: r.status,
                duration_ns: at_ns.saturating_sub(r.request_ns),
            }));
        }
    }

    /// The stream cannot be followed from here. A stream whose first bytes are not even shaped
    /// like an HTTP message (another protocol, a TLS handshake, binary) is simply not HTTP:
    /// it is left alone and counted nowhere. One that is HTTP, or starts like it, counts as
    /// unparsed.
    ///
    /// Losing track inside a chunked body (a size line the kernel did not copy, when it was
    /// told where to copy too late) is not counted: the message was counted when its header
    /// was; if the next one is missed in turn, that is counted (its response then has no
    /// request).
    fn lose(&mut self, d: usize, out: &mut Vec<Event>) {
        let requests = self.carries_requests(if d == 0 { Dir::Write } else { Dir::Read });
        let s = &mut self.streams[d];
        let at_start = s.mode == Mode::Start;
        let http_like = at_start && (s.messages > 0 || starts_message(&s.buf, requests));
        s.buf.clear();
        s.mode = if s.messages == 0 {
            Mode::Off
        } else {
            Mode::Lost
        };
        if http_like {
            out.push(Event::Unparsed);
        }
    }

    /// The connection ended at `at_ns`: a response read until close is complete.
    pub fn close(&mut self, at_ns: u64, out: &mut Vec<Event>) {
        let d = match self.role {
            Role::Client => Dir::Read,
            Role::Server => Dir::Write,
        } as usize;
        if self.streams[d].mode == Mode::UntilClose {
            self.finish(false, at_ns, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds whole calls (the kernel copies from where `next` says, at most `cap` bytes).
    struct Wire {
        conn: Conn,
        off: [u64; 2],
        out: Vec<Event>,
        cap: usize,
        now: u64,
    }

    impl Wire {
        fn new(role: Role) -> Wire {
            Wire {
                conn: Conn::new(role),
                off: [0, 0],
                out: Vec::new(),
                cap: 1024,
                now: 0,
            }
        }

        fn call(&mut self, dir: Dir, bytes: &[u8], at_ms: u64) {
            self.now = at_ms * 1_000_000;
            let d = dir as usize;
            let (offset, end) = (self.off[d], self.off[d] + bytes.len() as u64);
            self.off[d] = end;
            let next = self.conn.next()[d];
            if end < next {
                return;
            }
            let start = next.max(offset);
            let from = (start - offset) as usize;
            let data = &bytes[from..bytes.len().min(from + self.cap)];
            self.conn.feed(
                Chunk {
                    dir,
                    offset: start,
                    end,
                    data,
                    at_ns: self.now,
                },
                &mut self.out,
            );
        }

        fn exchanges(&self) -> Vec<(String, u16, u64)> {
            self.out
                .iter()
                .filter_map(|e| match e {
                    Event::Exchange(x) => {
                        Some((x.method.clone(), x.status, x.duration_ns / 1_000_000))
                    }
                    Event::Unparsed => None,
                })
                .collect()
        }

        fn unparsed(&self) -> usize {
            self.out.iter().filter(|e| **e == Event::Unparsed).count()
        }
    }

    const GET: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn keep_alive_requests_pair_in_order_with_durations() {
        let mut w = Wire::new(Role::Server);
        for i in 0..3 {
            w.call(Dir::Read, GET, 10 * i);
            w.call(
                Dir::Write,
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                10 * i + 3,
            );
        }
        assert_eq!(w.exchanges(), vec![("GET".into(), 200, 3); 3]);
        assert_eq!(w.unparsed(), 0);
    }

    #[test]
    fn pipelined_requests_in_one_read_and_responses_in_one_write() {
        let mut w = Wire::new(Role::Server);
        w.call(Dir::Read, &GET.repeat(16), 0);
        let resp = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno";
        w.call(Dir::Write, &resp.repeat(16), 7);
        assert_eq!(w.exchanges(), vec![("GET".into(), 404, 7); 16]);
    }

    #[test]
    fn a_large_body_is_skipped_and_its_end_times_the_response() {
        let mut w = Wire::new(Role::Client);
        w.call(Dir::Write, GET, 0);
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n";
        let body = vec![b'x'; 1 << 20];
        w.call(Dir::Read, head, 1);
        for (i, part) in body.chunks(65536).enumerate() {
            w.call(Dir::Read, part, 2 + i as u64);
        }
        assert_eq!(w.exchanges(), vec![("GET".into(), 200, 17)]);
        // The next exchange on the same connection is found.
        w.call(Dir::Write, GET, 30);
        w.call(
            Dir::Read,
            b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n",
            31,
        );
        assert_eq!(w.exchanges().last(), Some(&("GET".into(), 500, 1)));
    }

    #[test]
    fn chunked_bodies_both_ways() {
        let mut w = Wire::new(Role::Server);
        w.call(
            Dir::Read,
            b"POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            0,
        );
        w.call(Dir::Read, b"3;ext=1\r\nabc\r\n0\r\n\r\n", 1);
        w.call(
            Dir::Write,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwxyz\r\n",
            2,
        );
        w.call(Dir::Write, b"0\r\nX-Trailer: 1\r\n\r\n", 5);
        assert_eq!(w.exchanges(), vec![("POST".into(), 200, 5)]);
    }

    #[test]
    fn head_204_304_and_100_continue_have_no_body() {
        let mut w = Wire::new(Role::Client);
        w.call(Dir::Write, b"HEAD / HTTP/1.1\r\n\r\n", 0);
        w.call(
            Dir::Read,
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
            1,
        );
        w.call(Dir::Write, b"GET / HTTP/1.1\r\n\r\n", 2);
        w.call(Dir::Read, b"HTTP/1.1 204 No Content\r\n\r\n", 3);
        w.call(Dir::Write, b"GET / HTTP/1.1\r\n\r\n", 4);
        w.call(
            Dir::Read,
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
            5,
        );
        w.call(
            Dir::Write,
            b"PUT / HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
            6,
        );
        w.call(Dir::Read, b"HTTP/1.1 100 Continue\r\n\r\n", 7);
        w.call(Dir::Write, b"abc", 8);
        w.call(
            Dir::Read,
            b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
            9,
        );
        assert_eq!(
            w.exchanges(),
            vec![
                ("HEAD".into(), 200, 1),
                ("GET".into(), 204, 1),
                ("GET".into(), 304, 1),
                ("PUT".into(), 201, 3),
            ]
        );
        assert_eq!(w.unparsed(), 0);
    }

    #[test]
    fn a_response_until_close_ends_with_the_connection() {
        let mut w = Wire::new(Role::Client);
        w.call(Dir::Write, b"GET / HTTP/1.0\r\n\r\n", 0);
        w.call(Dir::Read, b"HTTP/1.0 200 OK\r\n\r\nbody", 1);
        w.call(Dir::Read, b"more body", 2);
        assert!(w.exchanges().is_empty());
        w.conn.close(4_000_000, &mut w.out);
        assert_eq!(w.exchanges(), vec![("GET".into(), 200, 4)]);
    }

    #[test]
    fn a_header_split_across_reads_is_joined() {
        let mut w = Wire::new(Role::Server);
        w.call(Dir::Read, b"GET /a HT", 0);
        w.call(Dir::Read, b"TP/1.1\r\nHost: x\r\n", 1);
        w.call(Dir::Read, b"\r\n", 2);
        w.call(
            Dir::Write,
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            6,
        );
        assert_eq!(w.exchanges(), vec![("GET".into(), 200, 6)]);
    }

    #[test]
    fn garbage_and_binary_are_not_http_and_never_counted() {
        // Not shaped like HTTP at all: another protocol, left alone and counted nowhere.
        for junk in [
            &b"\x00\x01\x02\x03binary"[..],
            b"hello world\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ] {
            let mut w = Wire::new(Role::Server);
            w.call(Dir::Read, junk, 0);
            w.call(
                Dir::Write,
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                1,
            );
            assert!(w.exchanges().is_empty(), "{junk:?}");
            assert_eq!(w.unparsed(), 1, "{junk:?}: only the answer to nothing");
            // Off for good: nothing more is copied for the request stream.
            assert_eq!(w.conn.next()[1], u64::MAX);
        }
        // Shaped like HTTP but malformed: unparsed, never a request.
        for bad in [
            &b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n"[..],
            b"GET /\x01 HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        ] {
            let mut w = Wire::new(Role::Server);
            w.call(Dir::Read, bad, 0);
            w.call(
                Dir::Write,
                b"HTTP/1.1 400 Bad\r\nContent-Length: 0\r\n\r\n",
                1,
            );
            assert!(w.exchanges().is_empty(), "{bad:?}");
            assert_eq!(
                w.unparsed(),
                2,
                "{bad:?}: the request, and the answer to nothing"
            );
        }
    }

    #[test]
    fn an_oversized_header_is_unparsed() {
        let mut w = Wire::new(Role::Server);
        w.cap = usize::MAX;
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 70 * 1024));
        w.call(Dir::Read, &big, 0);
        assert!(w.exchanges().is_empty());
        assert_eq!(w.unparsed(), 1);
    }

    #[test]
    fn a_lost_stream_picks_up_at_the_next_request() {
        let mut w = Wire::new(Role::Server);
        w.call(Dir::Read, GET, 0);
        w.call(
            Dir::Write,
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            1,
        );
        // A request line the kernel could not copy (beyond its capture) is lost...
        w.cap = 4;
        w.call(Dir::Read, GET, 2);
        assert_eq!(w.unparsed(), 1);
        w.call(
            Dir::Write,
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            3,
        );
        // ...and the next one is found again.
        w.cap = 1024;
        w.call(Dir::Read, GET, 4);
        w.call(
            Dir::Write,
            b"HTTP/1.1 201 OK\r\nContent-Length: 0\r\n\r\n",
            5,
        );
        let x = w.exchanges();
        assert_eq!(x.first(), Some(&("GET".into(), 200, 1)));
        assert_eq!(x.last(), Some(&("GET".into(), 201, 1)));
    }

    #[test]
    fn a_connection_joined_midway_is_parsed_from_its_next_message() {
        // An agent started while this keep-alive connection was open: 500 bytes of each
        // stream went by before it, and a body was being read.
        let mut w = Wire::new(Role::Client);
        w.conn = Conn::joined(Role::Client);
        w.off = [500, 700];
        w.call(Dir::Read, &[b'x'; 300], 0);
        w.call(Dir::Write, GET, 1);
        w.call(
            Dir::Read,
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
            4,
        );
        w.call(Dir::Write, GET, 5);
        w.call(
            Dir::Read,
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            6,
        );
        assert_eq!(
            w.exchanges(),
            vec![("GET".into(), 200, 3), ("GET".into(), 404, 1)]
        );
        assert_eq!(w.unparsed(), 0);
    }

    #[test]
    fn a_joined_stream_that_never_starts_a_message_is_given_up() {
        let mut w = Wire::new(Role::Server);
        w.conn = Conn::joined(Role::Server);
        w.off = [10, 10];
        for i in 0..JOIN_SEARCH as u64 {
            assert_eq!(w.conn.next()[1], 0, "still copied after {i} calls");
            w.call(Dir::Read, b"\x16\x03\x01 not http", i);
        }
        assert_eq!(w.conn.next()[1], u64::MAX);
        assert_eq!(w.unparsed(), 0);
    }

    /// A fixed-seed xorshift, for splitting streams at random places.
    fn rng(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut x = seed | 1;
        move |n| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n.max(1)
        }
    }

    #[test]
    fn however_the_calls_split_the_streams_the_exchanges_are_the_same() {
        let requests: Vec<u8> = [
            GET,
            b"POST /p HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcde",
            b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            b"HEAD /h HTTP/1.1\r\n\r\n",
        ]
        .concat();
        let responses: Vec<u8> = [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"[..],
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
        ]
        .concat();
        let want = vec![
            ("GET".to_string(), 200),
            ("POST".into(), 201),
            ("POST".into(), 200),
            ("HEAD".into(), 200),
        ];
        for seed in 1..200 {
            let mut r = rng(seed);
            let mut w = Wire::new(Role::Server);
            // All requests first (pipelined), in random pieces, then the responses.
            for stream in [(Dir::Read, &requests), (Dir::Write, &responses)] {
                let mut at = 0;
                while at < stream.1.len() {
                    let n = 1 + r(40) as usize;
                    let end = (at + n).min(stream.1.len());
                    w.call(stream.0, &stream.1[at..end], 0);
                    at = end;
                }
            }
            let got: Vec<(String, u16)> =
                w.exchanges().into_iter().map(|(m, s, _)| (m, s)).collect();
            assert_eq!(got, want, "seed {seed}");
            assert_eq!(w.unparsed(), 0, "seed {seed}");
        }
    }

    #[test]
    fn random_bytes_never_panic_and_never_count() {
        for seed in 1..300 {
            let mut r = rng(seed);
            let mut w = Wire::new(if seed % 2 == 0 {
                Role::Server
            } else {
                Role::Client
            });
            for _ in 0..20 {
                let len = r(300) as usize;
                let bytes: Vec<u8> = (0..len).map(|_| r(256) as u8).collect();
                let dir = if r(2) == 0 { Dir::Read } else { Dir::Write };
                w.call(dir, &bytes, 0);
            }
            assert!(w.exchanges().is_empty(), "seed {seed}");
        }
    }

    #[test]
    fn methods_outside_the_list_are_other() {
        assert_eq!(method_label("GET"), "GET");
        assert_eq!(method_label("PROPFIND"), "_OTHER");
    }
}
