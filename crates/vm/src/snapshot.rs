//! A suspended machine's memory as a file of its own, out of QEMU's migration stream.
//!
//! QEMU 7.2 writes a suspend as one precopy migration stream: every page of guest memory (the
//! `microvm.ram` block), then the devices' state. Restoring it means loading every page into fresh
//! memory before the guest runs again: ~7,400 page faults for a small guest's 29 MB, and on hosts
//! that take freed memory back, each of those pages is faulted in twice. [`split`] rewrites such a
//! stream into the block's pages at their offsets in a sparse file (zero pages are holes) and the
//! stream without them. A resume then maps the file copy-on-write as the guest's memory (the way a
//! boot template is restored, ADR 0023) and loads only the devices: the guest faults in the pages
//! it touches, when it touches them (ADR 0025).
//!
//! The rewritten stream is still a valid stream for QEMU's loader, which takes pages in any number
//! and order: only the block's page records are gone, and where one of another block (a ROM) said
//! "same block as the previous record" the name is written out. Whatever this parser does not know
//! (compressed or XBZRLE pages, an iterable section other than RAM, configuration subsections such
//! as the ones `x-ignore-shared` adds) is an error, and the caller keeps the whole stream, which is
//! always self-contained.
//!
//! The format, from QEMU 7.2's `migration/savevm.c` and `migration/ram.c`: a header (magic,
//! version, an optional configuration section naming the machine type), then sections — `START`
//! (id, name, instance, version) and `PART`/`END` (id) of the iterable `ram` device, each a run of
//! records ending in `EOS` and followed by a footer (`0x7e`, id) — and then the devices' `FULL`
//! sections and `EOF`, which are copied as they are. A RAM record is a big-endian u64 of page
//! offset | flags, the block's name unless `CONTINUE`, then one byte (`ZERO`: the page is filled
//! with it) or a page (`PAGE`). The first `START` also carries `MEM_SIZE`: every block's name and
//! length.

use std::fs::File;
use std::io::{self, BufRead, Write};
use std::os::unix::fs::FileExt;

const MAGIC: u32 = 0x5145_564d;
const VERSION: u32 = 3;

const SECTION_EOF: u8 = 0x00;
const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SECTION_FULL: u8 = 0x04;
const CONFIGURATION: u8 = 0x07;
const FOOTER: u8 = 0x7e;

const FLAG_ZERO: u64 = 0x02;
const FLAG_MEM_SIZE: u64 = 0x04;
const FLAG_PAGE: u64 = 0x08;
const FLAG_EOS: u64 = 0x10;
const FLAG_CONTINUE: u64 = 0x20;

/// x86's target page: QEMU's unit of RAM records.
const PAGE: usize = 4096;
const FLAGS_MASK: u64 = PAGE as u64 - 1;
/// Contiguous pages are written to the memory file in runs of up to this many bytes.
const RUN_MAX: usize = 1 << 20;

/// Why a stream could not be split (the caller keeps it whole).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SplitError {
    #[error("reading the snapshot or writing its parts: {0}")]
    Io(#[from] io::Error),
    #[error("not a stream this parser splits: {0}")]
    Unsupported(String),
}

fn unsupported<T>(what: impl Into<String>) -> Result<T, SplitError> {
    Err(SplitError::Unsupported(what.into()))
}

/// What [`split`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Split {
    /// The block's length: the memory file's size.
    pub(crate) block_len: u64,
    /// Pages with data written to the memory file.
    pub(crate) pages: u64,
}

/// Reads the whole stream `full`, writes the pages of RAM block `block` to `memory` (an empty
/// file: pages at their offsets, zero pages left as holes, sized to the block) and everything
/// else to `state`.
pub(crate) fn split(
    full: impl BufRead,
    block: &str,
    state: &mut impl Write,
    memory: &File,
) -> Result<Split, SplitError> {
    let mut p = Parser {
        r: full,
        out: state,
        block: block.as_bytes().to_vec(),
        mem: Memory::new(memory),
        last_in: None,
        last_out: None,
        ram_section: None,
    };
    p.run()?;
    let Some(len) = p.mem.len else {
        return unsupported(format!("no RAM block {block} in the stream"));
    };
    p.mem.flush()?;
    memory.set_len(len)?;
    Ok(Split {
        block_len: len,
        pages: p.mem.pages,
    })
}

struct Parser<'a, R, W> {
    r: R,
    out: &'a mut W,
    block: Vec<u8>,
    mem: Memory<'a>,
    /// The block of the last record read, and of the last one written (`CONTINUE` refers to it).
    last_in: Option<Vec<u8>>,
    last_out: Option<Vec<u8>>,
    ram_section: Option<u32>,
}

impl<R: BufRead, W: Write> Parser<'_, R, W> {
    fn run(&mut self) -> Result<(), SplitError> {
        let magic = self.be32()?;
        let version = self.be32()?;
        if magic != MAGIC || version != VERSION {
            return unsupported(format!("header {magic:#x} version {version}"));
        }
        self.out.write_all(&magic.to_be_bytes())?;
        self.out.write_all(&version.to_be_bytes())?;
        if self.peek()? == Some(CONFIGURATION) {
            let t = self.u8()?;
            let len = self.be32()?;
            let name = self.bytes(len as usize)?;
            self.out.write_all(&[t])?;
            self.out.write_all(&len.to_be_bytes())?;
            self.out.write_all(&name)?;
        }
        loop {
            let Some(t) = self.peek()? else {
                return unsupported("the stream ends before its devices' state");
            };
            match t {
                SECTION_START => {
                    self.u8()?;
                    let id = self.be32()?;
                    let name = self.name()?;
                    let instance = self.be32()?;
                    let version = self.be32()?;
                    if name != b"ram" {
                        return unsupported(format!(
                            "an iterable section {:?}",
                            String::from_utf8_lossy(&name)
                        ));
                    }
                    if self.ram_section.replace(id).is_some() {
                        return unsupported("two RAM sections");
                    }
                    self.out.write_all(&[t])?;
                    self.out.write_all(&id.to_be_bytes())?;
                    self.put_name(&name)?;
                    self.out.write_all(&instance.to_be_bytes())?;
                    self.out.write_all(&version.to_be_bytes())?;
                    self.ram_records()?;
                    self.footer(id)?;
                }
                SECTION_PART | SECTION_END => {
                    self.u8()?;
                    let id = self.be32()?;
                    if Some(id) != self.ram_section {
                        return unsupported(format!("section {id} is not RAM"));
                    }
                    self.out.write_all(&[t])?;
                    self.out.write_all(&id.to_be_bytes())?;
                    self.ram_records()?;
                    self.footer(id)?;
                }
                SECTION_FULL | SECTION_EOF => {
                    if self.ram_section.is_none() {
                        return unsupported("devices' state before any RAM");
                    }
                    // The devices' state and the end: copied as they are.
                    io::copy(&mut self.r, self.out)?;
                    return Ok(());
                }
                other => return unsupported(format!("section type {other:#x}")),
            }
        }
    }

    /// RAM records up to and including `EOS`.
    fn ram_records(&mut self) -> Result<(), SplitError> {
        loop {
            let header = self.be64()?;
            let flags = header & FLAGS_MASK;
            let offset = header & !FLAGS_MASK;
            match flags & !FLAG_CONTINUE {
                FLAG_EOS => {
                    self.out.write_all(&header.to_be_bytes())?;
                    return Ok(());
                }
                FLAG_MEM_SIZE => {
                    self.out.write_all(&header.to_be_bytes())?;
                    let mut left = offset;
                    while left > 0 {
                        let name = self.name()?;
                        let len = self.be64()?;
                        self.put_name(&name)?;
                        self.out.write_all(&len.to_be_bytes())?;
                        if name == self.block {
                            self.mem.set_len(len)?;
                        }
                        left = match left.checked_sub(len) {
                            Some(l) => l,
                            None => return unsupported("block lengths beyond the total"),
                        };
                    }
                }
                FLAG_ZERO | FLAG_PAGE => {
                    let name = if flags & FLAG_CONTINUE != 0 {
                        match &self.last_in {
                            Some(n) => n.clone(),
                            None => return unsupported("CONTINUE on the first page"),
                        }
                    } else {
                        self.name()?
                    };
                    let page = if flags & FLAG_PAGE != 0 {
                        Page::Data(self.bytes(PAGE)?)
                    } else {
                        Page::Fill(self.u8()?)
                    };
                    if name == self.block {
                        self.mem.put(offset, &page)?;
                    } else {
                        // Another block (a ROM): kept, named if the last record kept was not its.
                        let same = self.last_out.as_ref() == Some(&name);
                        let flags = (flags & !FLAG_CONTINUE) | if same { FLAG_CONTINUE } else { 0 };
                        self.out.write_all(&(offset | flags).to_be_bytes())?;
                        if !same {
                            self.put_name(&name)?;
                        }
                        match &page {
                            Page::Data(d) => self.out.write_all(d)?,
                            Page::Fill(b) => self.out.write_all(&[*b])?,
                        }
                        self.last_out = Some(name.clone());
                    }
                    self.last_in = Some(name);
                }
                other => return unsupported(format!("RAM record flags {other:#x}")),
            }
        }
    }

    /// A section's footer, if the stream has them.
    fn footer(&mut self, id: u32) -> Result<(), SplitError> {
        if self.peek()? == Some(FOOTER) {
            self.u8()?;
            let got = self.be32()?;
            if got != id {
                return unsupported(format!("section {id} ends with the footer of {got}"));
            }
            self.out.write_all(&[FOOTER])?;
            self.out.write_all(&id.to_be_bytes())?;
        }
        Ok(())
    }

    fn peek(&mut self) -> io::Result<Option<u8>> {
        Ok(self.r.fill_buf()?.first().copied())
    }

    fn u8(&mut self) -> io::Result<u8> {
        let mut b = [0u8; 1];
        self.r.read_exact(&mut b)?;
        Ok(b[0])
    }

    fn be32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.r.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn be64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    fn bytes(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.r.read_exact(&mut b)?;
        Ok(b)
    }

    /// A name: one length byte, then the bytes.
    fn name(&mut self) -> io::Result<Vec<u8>> {
        let len = self.u8()?;
        self.bytes(usize::from(len))
    }

    fn put_name(&mut self, name: &[u8]) -> io::Result<()> {
        // Read as a one-byte length, so it fits.
        self.out
            .write_all(&[u8::try_from(name.len()).unwrap_or(u8::MAX)])?;
        self.out.write_all(name)
    }
}

enum Page {
    Data(Vec<u8>),
    /// Every byte of the page is this one.
    Fill(u8),
}

/// The memory file being written: contiguous pages are gathered into one write.
struct Memory<'a> {
    file: &'a File,
    len: Option<u64>,
    /// Pages written (one bit each), so that a page sent again as zeros is zeroed.
    written: Vec<u64>,
    pages: u64,
    run_offset: u64,
    run: Vec<u8>,
}

impl<'a> Memory<'a> {
    fn new(file: &'a File) -> Self {
        Self {
            file,
            len: None,
            written: Vec::new(),
            pages: 0,
            run_offset: 0,
            run: Vec::with_capacity(RUN_MAX),
        }
    }

    fn set_len(&mut self, len: u64) -> Result<(), SplitError> {
        if self.len.is_some() {
            return unsupported("the block is listed twice");
        }
        let pages = usize::try_from(len / PAGE as u64)
            .map_err(|_| SplitError::Unsupported("a block this large".into()))?;
        self.written = vec![0; pages.div_ceil(64)];
        self.len = Some(len);
        Ok(())
    }

    fn put(&mut self, offset: u64, page: &Page) -> Result<(), SplitError> {
        let Some(len) = self.len else {
            return unsupported("a page before the block's length");
        };
        if offset.checked_add(PAGE as u64).is_none_or(|end| end > len) {
            return unsupported(format!(
                "a page at {offset:#x}, beyond the block's {len:#x} bytes"
            ));
        }
        let index = usize::try_from(offset / PAGE as u64).unwrap_or(usize::MAX);
        let (word, bit) = (index / 64, 1u64 << (index % 64));
        let data: Option<std::borrow::Cow<'_, [u8]>> = match page {
            Page::Data(d) if d.iter().any(|&b| b != 0) => Some(d.as_slice().into()),
            Page::Fill(b) if *b != 0 => Some(vec![*b; PAGE].into()),
            // A zero page over one written before: zero it; else it stays a hole.
            _ if self.written[word] & bit != 0 => Some(vec![0; PAGE].into()),
            _ => None,
        };
        let Some(data) = data else { return Ok(()) };
        if self.written[word] & bit == 0 {
            self.pages += 1;
        }
        self.written[word] |= bit;
        if self.run_offset + self.run.len() as u64 != offset || self.run.len() >= RUN_MAX {
            self.flush()?;
            self.run_offset = offset;
        }
        self.run.extend_from_slice(&data);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.run.is_empty() {
            self.file.write_all_at(&self.run, self.run_offset)?;
            self.run.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const RAM: &str = "microvm.ram";
    const ROM: &str = "/rom@etc/acpi";

    /// A stream builder in QEMU's format.
    #[derive(Default)]
    struct S(Vec<u8>);

    impl S {
        fn header(mut self) -> Self {
            self.0.extend(MAGIC.to_be_bytes());
            self.0.extend(VERSION.to_be_bytes());
            self.0.push(CONFIGURATION);
            self.0.extend(7u32.to_be_bytes());
            self.0.extend(b"microvm");
            self
        }
        fn byte(mut self, b: u8) -> Self {
            self.0.push(b);
            self
        }
        fn be32(mut self, v: u32) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn be64(mut self, v: u64) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn name(mut self, n: &str) -> Self {
            self.0.push(u8::try_from(n.len()).unwrap());
            self.0.extend(n.as_bytes());
            self
        }
        fn start(self, id: u32) -> Self {
            self.byte(SECTION_START).be32(id).name("ram").be32(0).be32(4)
        }
        fn mem_size(self, blocks: &[(&str, u64)]) -> Self {
            let total: u64 = blocks.iter().map(|b| b.1).sum();
            let mut s = self.be64(total | FLAG_MEM_SIZE);
            for (n, l) in blocks {
                s = s.name(n).be64(*l);
            }
            s
        }
        fn page(self, block: Option<&str>, offset: u64, fill: u8) -> Self {
            let s = match block {
                Some(b) => self.be64(offset | FLAG_PAGE).name(b),
                None => self.be64(offset | FLAG_PAGE | FLAG_CONTINUE),
            };
            let mut s = s;
            s.0.extend(std::iter::repeat_n(fill, PAGE));
            s
        }
        fn zero(self, block: Option<&str>, offset: u64) -> Self {
            match block {
                Some(b) => self.be64(offset | FLAG_ZERO).name(b).byte(0),
                None => self.be64(offset | FLAG_ZERO | FLAG_CONTINUE).byte(0),
            }
        }
        fn eos(self) -> Self {
            self.be64(FLAG_EOS)
        }
        fn footer(self, id: u32) -> Self {
            self.byte(FOOTER).be32(id)
        }
        fn devices(self) -> Self {
            // A FULL section and EOF: opaque to the splitter.
            self.byte(SECTION_FULL)
                .be32(9)
                .name("serial")
                .be32(0)
                .be32(1)
                .be64(0xdead_beef)
                .footer(9)
                .byte(SECTION_EOF)
        }
    }

    fn run(stream: &[u8]) -> Result<(Split, Vec<u8>, Vec<u8>), SplitError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let mem = File::create(&path).unwrap();
        let mut state = Vec::new();
        let s = split(Cursor::new(stream), RAM, &mut state, &mem)?;
        Ok((s, state, std::fs::read(&path).unwrap()))
    }

    #[test]
    fn pages_of_the_block_go_to_the_file_and_the_rest_stays() {
        let len = 16 * PAGE as u64;
        let full = S::default()
            .header()
            .start(2)
            .mem_size(&[(RAM, len), (ROM, PAGE as u64)])
            .eos()
            .footer(2)
            .byte(SECTION_PART)
            .be32(2)
            .page(Some(RAM), 0, 0xaa)
            .page(None, PAGE as u64, 0xbb)
            .zero(None, 2 * PAGE as u64)
            .page(None, 5 * PAGE as u64, 0xcc)
            .page(Some(ROM), 0, 0x11)
            .page(Some(RAM), 15 * PAGE as u64, 0xdd)
            .eos()
            .footer(2)
            .byte(SECTION_END)
            .be32(2)
            .eos()
            .footer(2)
            .devices();
        let (s, state, mem) = run(&full.0).unwrap();
        assert_eq!(
            s,
            Split {
                block_len: len,
                pages: 4
            }
        );
        assert_eq!(mem.len() as u64, len);
        for (page, fill) in [(0, 0xaa), (1, 0xbb), (2, 0), (3, 0), (5, 0xcc), (15, 0xdd)] {
            assert!(
                mem[page * PAGE..(page + 1) * PAGE].iter().all(|&b| b == fill),
                "page {page}"
            );
        }
        // What the loader gets: the same stream with the ROM's page named (its record followed
        // one of the block's that is gone) and no page of the block.
        let expect = S::default()
            .header()
            .start(2)
            .mem_size(&[(RAM, len), (ROM, PAGE as u64)])
            .eos()
            .footer(2)
            .byte(SECTION_PART)
            .be32(2)
            .page(Some(ROM), 0, 0x11)
            .eos()
            .footer(2)
            .byte(SECTION_END)
            .be32(2)
            .eos()
            .footer(2)
            .devices();
        assert_eq!(state, expect.0);
    }

    #[test]
    fn a_rom_after_a_rom_keeps_continue() {
        let full = S::default()
            .header()
            .start(2)
            .mem_size(&[(ROM, 2 * PAGE as u64), (RAM, PAGE as u64)])
            .page(Some(ROM), 0, 1)
            .page(None, PAGE as u64, 2)
            .eos()
            .footer(2)
            .devices();
        let (_, state, _) = run(&full.0).unwrap();
        assert_eq!(state, full.0, "nothing of the block to take out");
    }

    #[test]
    fn a_page_sent_again_as_zeros_is_zeroed() {
        let full = S::default()
            .header()
            .start(2)
            .mem_size(&[(RAM, 4 * PAGE as u64)])
            .page(Some(RAM), PAGE as u64, 7)
            .zero(None, PAGE as u64)
            .eos()
            .footer(2)
            .devices();
        let (s, _, mem) = run(&full.0).unwrap();
        assert_eq!(s.pages, 1);
        assert!(mem.iter().all(|&b| b == 0));
    }

    #[test]
    fn what_it_does_not_know_is_refused() {
        let base = || S::default().header().start(2).mem_size(&[(RAM, 4 * PAGE as u64)]);
        let cases = [
            ("xbzrle", base().be64(0x40).name(RAM).eos().footer(2).devices()),
            (
                "beyond the block",
                base()
                    .page(Some(RAM), 4 * PAGE as u64, 1)
                    .eos()
                    .footer(2)
                    .devices(),
            ),
            (
                "continue first",
                base().page(None, 0, 1).eos().footer(2).devices(),
            ),
            ("truncated", base().page(Some(RAM), 0, 1)),
            ("no devices", base().eos().footer(2)),
            (
                "another iterable",
                S::default()
                    .header()
                    .byte(SECTION_START)
                    .be32(3)
                    .name("block")
                    .be32(0)
                    .be32(1),
            ),
            (
                "no block",
                S::default()
                    .header()
                    .start(2)
                    .mem_size(&[(ROM, 4096)])
                    .eos()
                    .footer(2)
                    .devices(),
            ),
            ("bad magic", S::default().be32(1).be32(3)),
            (
                "a subsection after the configuration (x-ignore-shared)",
                S::default()
                    .header()
                    .byte(0x05)
                    .name("configuration/capabilities"),
            ),
        ];
        for (what, s) in cases {
            assert!(run(&s.0).is_err(), "{what} was split");
        }
    }
}
