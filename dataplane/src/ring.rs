//! A reader of a BPF ring buffer (`BPF_MAP_TYPE_RINGBUF`) that lets the caller decide when the
//! consumer position moves: records are read at a cursor of the reader's own, and given back
//! to the kernel only when the caller says. Telemetry first makes what it counted durable (its
//! checkpoint names the cursor), then releases up to there, so a killed agent neither loses nor
//! re-counts an event. aya's reader releases each record as it is dropped, which cannot give
//! that.
//!
//! The layout is the kernel's (kernel/bpf/ringbuf.c): the consumer page (read-write, at offset
//! 0), then the producer page and the data pages mapped twice in a row (read-only), so a record
//! that wraps is contiguous. Each record has an 8-byte header: its length with the BUSY (bit 31)
//! and DISCARD (bit 30) flags, and a page offset; records are 8-byte aligned.

use std::{
    os::fd::{AsRawFd, BorrowedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

const BUSY: u32 = 1 << 31;
const DISCARD: u32 = 1 << 30;
const HEADER: u64 = 8;

pub struct Ring {
    consumer: NonNull<libc::c_void>,
    producer: NonNull<libc::c_void>,
    page: usize,
    size: u64,
    /// Where the next read starts: at or after the consumer position.
    cursor: u64,
}

// SAFETY: the mappings are owned by this value and only used through `&mut self`.
unsafe impl Send for Ring {}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("size", &self.size).finish()
    }
}

impl Ring {
    /// Maps the ring buffer `fd` of `size` bytes (its `max_entries`).
    pub fn new(fd: BorrowedFd<'_>, size: u32) -> std::io::Result<Ring> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let map = |len: usize, prot: i32, offset: usize| {
            // SAFETY: a fresh shared mapping of the map's fd; the kernel checks length,
            // protection and offset against the ring's layout.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    prot,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    offset as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(NonNull::new(p).expect("mmap never returns null on success"))
            }
        };
        let consumer = map(page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = match map(page + 2 * size as usize, libc::PROT_READ, page) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: the mapping made just above.
                unsafe { libc::munmap(consumer.as_ptr(), page) };
                return Err(e);
            }
        };
        let mut ring = Ring {
            consumer,
            producer,
            page,
            size: u64::from(size),
            cursor: 0,
        };
        ring.cursor = ring.position();
        Ok(ring)
    }

    fn consumer_pos(&self) -> &AtomicU64 {
        // SAFETY: the consumer page starts with the kernel's `unsigned long consumer_pos`,
        // 8-byte aligned (page aligned).
        unsafe { AtomicU64::from_ptr(self.consumer.as_ptr().cast()) }
    }

    fn producer_pos(&self) -> &AtomicU64 {
        // SAFETY: as above, for the producer page.
        unsafe { AtomicU64::from_ptr(self.producer.as_ptr().cast()) }
    }

    /// The position up to which records have been released.
    pub fn position(&self) -> u64 {
        self.consumer_pos().load(Ordering::Acquire)
    }

    /// Skips forward to `pos` (records before it were counted by an earlier agent). A `pos`
    /// behind the current position or past what was produced is ignored; returns whether it
    /// was applied.
    pub fn skip_to(&mut self, pos: u64) -> bool {
        let (cons, prod) = (self.position(), self.producer_pos().load(Ordering::Acquire));
        if pos <= cons || pos > prod {
            return false;
        }
        self.consumer_pos().store(pos, Ordering::Release);
        self.cursor = pos;
        true
    }

    /// Where the next read starts (everything before it was read).
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Calls `f` with each complete record after the cursor, at most `max`, and moves the
    /// cursor past them without releasing them; returns how many were read.
    pub fn read(&mut self, max: usize, mut f: impl FnMut(&[u8])) -> usize {
        let mut cons = self.cursor;
        let prod = self.producer_pos().load(Ordering::Acquire);
        let data = self.producer.as_ptr().cast::<u8>().wrapping_add(self.page);
        let mut n = 0;
        while cons < prod && n < max {
            let at = (cons & (self.size - 1)) as usize;
            // SAFETY: `at` is inside the first copy of the data pages; the header is 8-byte
            // aligned, its length word read with acquire as the kernel's commit publishes it.
            let hdr =
                unsafe { AtomicU32::from_ptr(data.add(at).cast::<u32>()) }.load(Ordering::Acquire);
            if hdr & BUSY != 0 {
                break;
            }
            let len = hdr & !(BUSY | DISCARD);
            if hdr & DISCARD == 0 {
                // SAFETY: a committed record of `len` bytes after its header; the double
                // mapping makes it contiguous even where it wraps.
                let body = unsafe {
                    std::slice::from_raw_parts(data.add(at + HEADER as usize), len as usize)
                };
                f(body);
                n += 1;
            }
            cons += (u64::from(len) + HEADER).next_multiple_of(8);
        }
        self.cursor = cons;
        n
    }

    /// Whether the kernel has produced records not yet read.
    pub fn has_records(&self) -> bool {
        self.backlog() > 0
    }

    /// Bytes produced and not yet read.
    pub fn backlog(&self) -> u64 {
        self.producer_pos()
            .load(Ordering::Acquire)
            .saturating_sub(self.cursor)
    }

    /// Bytes read and not yet released (the kernel cannot reuse them yet).
    pub fn unreleased(&self) -> u64 {
        self.cursor.saturating_sub(self.position())
    }

    /// Gives everything read so far back to the kernel.
    pub fn release(&mut self) {
        self.consumer_pos().store(self.cursor, Ordering::Release);
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the mappings made in `new`, with their lengths.
        unsafe {
            libc::munmap(self.consumer.as_ptr(), self.page);
            libc::munmap(self.producer.as_ptr(), self.page + 2 * self.size as usize);
        }
    }
}

/// A record's body as a `T` (a `#[repr(C)]` type the kernel programs write); `None` if it is
/// shorter.
pub fn record<T: aya::Pod>(body: &[u8]) -> Option<T> {
    (body.len() >= size_of::<T>())
        // SAFETY: `T` is plain data (aya::Pod) and `body` holds at least its size; read
        // unaligned, as a ring record is only 8-byte aligned.
        .then(|| unsafe { std::ptr::read_unaligned(body.as_ptr().cast::<T>()) })
}
