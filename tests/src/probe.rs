//! The wire protocol of `ml-probe`, our byte-exact transfer checker.
//!
//! The client sends N bytes of a position-dependent pattern (so a lost, duplicated or reordered
//! byte is caught, not just a short count), then `shutdown(SHUT_WR)`. The server reads to EOF,
//! checking every byte, and answers with one line: `RESULT <bytes> <pattern-ok 0|1> <tag>`. In
//! duplex mode the server first streams D pattern bytes back while it reads.

/// Byte `i` of every stream.
#[inline]
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 9) ^ (i >> 17)) as u8
}

/// Checks `buf`, which starts at stream offset `off`; returns the first bad offset.
pub fn first_mismatch(buf: &[u8], off: u64) -> Option<u64> {
    buf.iter()
        .enumerate()
        .find(|(i, b)| **b != pattern(off + *i as u64))
        .map(|(i, _)| off + i as u64)
}

/// Fills `buf` with the pattern starting at offset `off`.
pub fn fill(buf: &mut [u8], off: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(off + i as u64);
    }
}

/// The server's answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    pub bytes: u64,
    pub pattern_ok: bool,
    pub tag: String,
}

impl Verdict {
    pub fn line(&self) -> String {
        format!(
            "RESULT {} {} {}\n",
            self.bytes,
            self.pattern_ok as u8,
            if self.tag.is_empty() { "-" } else { &self.tag }
        )
    }

    pub fn parse(s: &str) -> Option<Verdict> {
        let mut it = s.split_whitespace();
        if it.next()? != "RESULT" {
            return None;
        }
        let bytes = it.next()?.parse().ok()?;
        let pattern_ok = it.next()? == "1";
        let tag = it.next()?.to_string();
        Some(Verdict {
            bytes,
            pattern_ok,
            tag: if tag == "-" { String::new() } else { tag },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_detects_a_swap() {
        let mut b = vec![0u8; 4096];
        fill(&mut b, 100);
        assert_eq!(first_mismatch(&b, 100), None);
        b.swap(10, 2000);
        assert!(first_mismatch(&b, 100).is_some());
    }

    #[test]
    fn verdict_round_trip() {
        let v = Verdict {
            bytes: 42,
            pattern_ok: true,
            tag: "a".into(),
        };
        assert_eq!(Verdict::parse(&v.line()), Some(v));
        assert_eq!(Verdict::parse("nonsense"), None);
    }
}
