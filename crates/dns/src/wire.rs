//! The DNS message codec, for the part of DNS this server needs: parsing queries (RFC 1035, with
//! the EDNS0 OPT record of RFC 6891), building answers from the zone (`A`, `AAAA`, `TXT`, `SOA`,
//! with name compression and truncation), and the few header and question operations a relay
//! needs on messages it passes through.
//!
//! Parsing never panics and never reads out of bounds, whatever the bytes: compression pointers
//! must point strictly before every byte of the name read so far (so they cannot loop) and are
//! followed at most [`MAX_POINTER_HOPS`] times; labels are at most 63 bytes and names 255.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Length of a message header.
pub const HEADER_LEN: usize = 12;
/// Largest UDP message for a query without EDNS (RFC 1035).
pub const UDP_LIMIT: usize = 512;
/// The UDP payload size this server advertises and the most it sends over UDP (the DNS flag
/// day's 1232 bytes: no IP fragmentation on any usual path).
pub const EDNS_PAYLOAD: u16 = 1232;
/// Largest message over TCP (its 2-byte length prefix).
pub const TCP_LIMIT: usize = 65_535;
/// Most compression pointers followed in one name.
pub const MAX_POINTER_HOPS: usize = 64;
/// Longest name in wire form, length bytes and the root label included.
pub const MAX_NAME_LEN: usize = 255;
/// Longest label.
pub const MAX_LABEL_LEN: usize = 63;

/// Record type `A`.
pub const TYPE_A: u16 = 1;
/// Record type `NS`.
pub const TYPE_NS: u16 = 2;
/// Record type `SOA`.
pub const TYPE_SOA: u16 = 6;
/// Record type `TXT`.
pub const TYPE_TXT: u16 = 16;
/// Record type `AAAA`.
pub const TYPE_AAAA: u16 = 28;
/// Pseudo-record type `OPT` (EDNS).
pub const TYPE_OPT: u16 = 41;
/// Query type `IXFR`.
pub const TYPE_IXFR: u16 = 251;
/// Query type `AXFR`.
pub const TYPE_AXFR: u16 = 252;
/// Query type `ANY` (`*`).
pub const TYPE_ANY: u16 = 255;
/// Class `IN`.
pub const CLASS_IN: u16 = 1;
/// Query class `ANY`.
pub const CLASS_ANY: u16 = 255;
/// Opcode of a standard query.
pub const OPCODE_QUERY: u8 = 0;

const FLAG_QR: u16 = 0x8000;
const OPCODE_BITS: u16 = 0x7800;
const FLAG_AA: u16 = 0x0400;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;
const FLAG_CD: u16 = 0x0010;
/// The EDNS `DO` bit in an OPT record's TTL field.
const EDNS_DO: u32 = 0x8000;
/// Where the question starts, and so the first name: the target of answers' owner pointers.
const QUESTION_AT: u16 = 12;

/// Why a message cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The message ends in the middle of something.
    #[error("the message is truncated")]
    Truncated,
    /// A query must ask exactly one question.
    #[error("the message has {0} questions, not 1")]
    QuestionCount(u16),
    /// A name is longer than 255 bytes.
    #[error("a name is longer than 255 bytes")]
    NameTooLong,
    /// A label type other than a plain label or a compression pointer.
    #[error("a label has an unsupported type")]
    BadLabel,
    /// A compression pointer that does not point before the name, or too many of them.
    #[error("a compression pointer loops or points forward")]
    BadPointer,
    /// An OPT record not owned by the root, or more than one.
    #[error("the EDNS OPT record is malformed or repeated")]
    BadOpt,
    /// A name given as text has an empty or over-long label.
    #[error("a name has an empty label or a label longer than 63 bytes")]
    BadText,
}

/// A response code, with EDNS's extended `BADVERS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rcode {
    /// No error.
    NoError,
    /// The query was malformed.
    FormErr,
    /// The server failed (an upstream did not answer).
    ServFail,
    /// The name does not exist.
    NxDomain,
    /// The server does not implement the operation.
    NotImp,
    /// The server will not answer this.
    Refused,
    /// The query's EDNS version is not supported (12-bit code 16).
    BadVers,
}

impl Rcode {
    /// The 12-bit code: the header's low 4 bits, the OPT record's 8 high bits.
    pub fn code(self) -> u16 {
        match self {
            Self::NoError => 0,
            Self::FormErr => 1,
            Self::ServFail => 2,
            Self::NxDomain => 3,
            Self::NotImp => 4,
            Self::Refused => 5,
            Self::BadVers => 16,
        }
    }
}

/// A domain name in uncompressed wire form, in the case it was given. `==` compares the bytes;
/// [`Name::eq_ignore_case`] compares names as DNS does.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Name {
    /// Length-prefixed labels ending with the root's 0; at most [`MAX_NAME_LEN`] bytes.
    wire: Vec<u8>,
}

impl Name {
    /// The root name.
    pub fn root() -> Self {
        Self { wire: vec![0] }
    }

    /// A name from dotted text (`app.internal`, a final dot optional, `.` or empty for the root).
    /// No escapes: each label is taken as it is written.
    pub fn from_text(text: &str) -> Result<Self, WireError> {
        let text = text.strip_suffix('.').unwrap_or(text);
        let mut wire = Vec::with_capacity(text.len() + 2);
        if !text.is_empty() {
            for label in text.split('.') {
                let len = u8::try_from(label.len()).map_err(|_| WireError::BadText)?;
                if label.is_empty() || label.len() > MAX_LABEL_LEN {
                    return Err(WireError::BadText);
                }
                wire.push(len);
                wire.extend_from_slice(label.as_bytes());
            }
        }
        wire.push(0);
        if wire.len() > MAX_NAME_LEN {
            return Err(WireError::NameTooLong);
        }
        Ok(Self { wire })
    }

    /// The name in uncompressed wire form.
    pub fn as_wire(&self) -> &[u8] {
        &self.wire
    }

    /// The labels, leftmost first, without the root, in the case they were given.
    pub fn labels(&self) -> Labels<'_> {
        Labels { rest: &self.wire }
    }

    /// Whether two names are the same name (ASCII case ignored).
    pub fn eq_ignore_case(&self, other: &Self) -> bool {
        // Length bytes are below 64, so never letters: comparing the whole wire form
        // case-insensitively compares labels case-insensitively.
        self.wire.eq_ignore_ascii_case(&other.wire)
    }

    /// Offsets in the wire form where each suffix starts (the whole name first, the root last).
    fn suffix_offsets(&self) -> impl Iterator<Item = usize> + '_ {
        let mut at = Some(0);
        std::iter::from_fn(move || {
            let here = at?;
            let len = usize::from(*self.wire.get(here)?);
            at = (len != 0).then_some(here + 1 + len);
            Some(here)
        })
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Name({self})")
    }
}

/// The name in presentation form: dotted, with a final dot, unusual bytes escaped.
impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut any = false;
        for label in self.labels() {
            any = true;
            for &b in label {
                match b {
                    b'.' | b'\\' | b'"' => write!(f, "\\{}", char::from(b))?,
                    0x21..=0x7e => write!(f, "{}", char::from(b))?,
                    _ => write!(f, "\\{b:03}")?,
                }
            }
            f.write_str(".")?;
        }
        if !any {
            f.write_str(".")?;
        }
        Ok(())
    }
}

/// The labels of a [`Name`].
#[derive(Debug, Clone)]
pub struct Labels<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Labels<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let (&len, rest) = self.rest.split_first()?;
        let label = rest.get(..usize::from(len)).filter(|l| !l.is_empty())?;
        self.rest = rest.get(usize::from(len)..).unwrap_or_default();
        Some(label)
    }
}

/// The question of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// The name asked about, in the case it was asked.
    pub name: Name,
    /// The type asked for.
    pub qtype: u16,
    /// The class asked in.
    pub qclass: u16,
}

impl Question {
    /// Whether `other` asks the same: the same name (case ignored), type and class.
    pub fn same_as(&self, other: &Self) -> bool {
        self.name.eq_ignore_case(&other.name) && self.qtype == other.qtype && self.qclass == other.qclass
    }
}

/// What the query's EDNS OPT record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    /// The largest UDP response the asker accepts.
    pub payload_size: u16,
    /// The EDNS version (this server speaks 0).
    pub version: u8,
    /// The `DO` bit: the asker wants DNSSEC records.
    pub dnssec_ok: bool,
}

/// A parsed query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Its id.
    pub id: u16,
    /// Its opcode.
    pub opcode: u8,
    /// Recursion desired.
    pub rd: bool,
    /// Checking disabled (DNSSEC).
    pub cd: bool,
    /// The question.
    pub question: Question,
    /// Its OPT record, if any.
    pub edns: Option<Edns>,
}

impl Query {
    /// The largest UDP answer this query may get: 512 bytes without EDNS, else the asker's
    /// payload size capped at [`EDNS_PAYLOAD`] and at least 512.
    pub fn udp_limit(&self) -> usize {
        self.edns.map_or(UDP_LIMIT, |e| {
            usize::from(e.payload_size).clamp(UDP_LIMIT, usize::from(EDNS_PAYLOAD))
        })
    }
}

/// The data of a record this server sends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RData {
    /// An IPv4 address.
    A(Ipv4Addr),
    /// An IPv6 address.
    Aaaa(Ipv6Addr),
    /// Text, sent as character-strings of at most 255 bytes each, in one record.
    Txt(Vec<u8>),
    /// A zone's start of authority.
    Soa(Soa),
}

impl RData {
    /// Its record type.
    pub fn rtype(&self) -> u16 {
        match self {
            Self::A(_) => TYPE_A,
            Self::Aaaa(_) => TYPE_AAAA,
            Self::Txt(_) => TYPE_TXT,
            Self::Soa(_) => TYPE_SOA,
        }
    }
}

/// A zone's `SOA` record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Soa {
    /// The zone's apex, the record's owner.
    pub zone: Name,
    /// The primary name server.
    pub mname: Name,
    /// The responsible mailbox.
    pub rname: Name,
    /// The zone's serial.
    pub serial: u32,
    /// Secondaries' refresh interval, seconds.
    pub refresh: u32,
    /// Secondaries' retry interval, seconds.
    pub retry: u32,
    /// Secondaries' expiry, seconds.
    pub expire: u32,
    /// Negative-caching time, seconds (RFC 2308).
    pub minimum: u32,
}

/// What to answer a query with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The response code.
    pub rcode: Rcode,
    /// Whether the answer is authoritative (the `AA` flag).
    pub authoritative: bool,
    /// The answers, all owned by the question's name, in this order.
    pub answers: Vec<RData>,
    /// The zone's `SOA`, for the authority section of a negative answer.
    pub soa: Option<Soa>,
    /// Time to live of every record, seconds.
    pub ttl: u32,
}

impl Reply {
    /// A non-authoritative answer with no records.
    pub fn error(rcode: Rcode) -> Self {
        Self {
            rcode,
            authoritative: false,
            answers: Vec::new(),
            soa: None,
            ttl: 0,
        }
    }
}

/// A message's id, if it has a header.
pub fn id(msg: &[u8]) -> Option<u16> {
    read_u16(msg, 0).ok()
}

/// Replaces a message's id (nothing if it has no header).
pub fn set_id(msg: &mut [u8], id: u16) {
    if let Some(b) = msg.get_mut(..2) {
        b.copy_from_slice(&id.to_be_bytes());
    }
}

/// Whether a message is a response (its `QR` bit), false if it has no header.
pub fn is_response(msg: &[u8]) -> bool {
    read_u16(msg, 2).is_ok_and(|f| f & FLAG_QR != 0)
}

/// A message's opcode, if it has a header.
pub fn opcode(msg: &[u8]) -> Option<u8> {
    let flags = read_u16(msg, 2).ok()?;
    u8::try_from((flags & OPCODE_BITS) >> 11).ok()
}

/// A message's (only) question, and where the question section ends.
fn read_question(msg: &[u8]) -> Result<(Question, usize), WireError> {
    let qdcount = read_u16(msg, 4)?;
    if qdcount != 1 {
        return Err(WireError::QuestionCount(qdcount));
    }
    let (name, at) = read_name(msg, HEADER_LEN)?;
    let qtype = read_u16(msg, at)?;
    let qclass = read_u16(msg, at + 2)?;
    Ok((Question { name, qtype, qclass }, at + 4))
}

/// A message's question, if it has exactly one that can be read.
pub fn question(msg: &[u8]) -> Result<Question, WireError> {
    read_question(msg).map(|(q, _)| q)
}

/// Whether `response` is a response to the same question as `query` asks (name, case ignored,
/// type and class): what a relay checks before it believes an upstream.
pub fn same_question(query: &[u8], response: &[u8]) -> bool {
    match (question(query), question(response)) {
        (Ok(q), Ok(r)) => q.same_as(&r),
        _ => false,
    }
}

/// Parses a query: the header, exactly one question, and the EDNS OPT record among the other
/// records (which are skipped). The header's `QR` bit and opcode are not checked here.
pub fn parse_query(msg: &[u8]) -> Result<Query, WireError> {
    let id = read_u16(msg, 0)?;
    let flags = read_u16(msg, 2)?;
    let (question, mut at) = read_question(msg)?;
    let others = [read_u16(msg, 6)?, read_u16(msg, 8)?];
    for _ in 0..others.iter().map(|&n| u32::from(n)).sum::<u32>() {
        at = skip_record(msg, at)?.0;
    }
    let mut edns = None;
    for _ in 0..read_u16(msg, 10)? {
        let (next, record) = skip_record(msg, at)?;
        if record.rtype == TYPE_OPT {
            if edns.is_some() || !record.root_owner {
                return Err(WireError::BadOpt);
            }
            edns = Some(Edns {
                payload_size: record.class,
                version: record.ttl.to_be_bytes()[1],
                dnssec_ok: record.ttl & EDNS_DO != 0,
            });
        }
        at = next;
    }
    Ok(Query {
        id,
        opcode: u8::try_from((flags & OPCODE_BITS) >> 11).unwrap_or_default(),
        rd: flags & FLAG_RD != 0,
        cd: flags & FLAG_CD != 0,
        question,
        edns,
    })
}

/// The fixed part of a record that was skipped.
struct Skipped {
    root_owner: bool,
    rtype: u16,
    class: u16,
    ttl: u32,
}

/// Skips the record at `at`: where the next one starts, and its fixed fields.
fn skip_record(msg: &[u8], at: usize) -> Result<(usize, Skipped), WireError> {
    let (owner, at) = read_name(msg, at)?;
    let rtype = read_u16(msg, at)?;
    let class = read_u16(msg, at + 2)?;
    let ttl = u32::from(read_u16(msg, at + 4)?) << 16 | u32::from(read_u16(msg, at + 6)?);
    let len = usize::from(read_u16(msg, at + 8)?);
    let end = at + 10 + len;
    if end > msg.len() {
        return Err(WireError::Truncated);
    }
    let root_owner = owner.wire == [0];
    Ok((
        end,
        Skipped {
            root_owner,
            rtype,
            class,
            ttl,
        },
    ))
}

/// Reads the name at `start`, following compression pointers: the name, and where the bytes
/// after it (after its first pointer, if any) start.
fn read_name(msg: &[u8], start: usize) -> Result<(Name, usize), WireError> {
    let mut wire = Vec::with_capacity(32);
    let mut at = start;
    // Every pointer must point before everything read so far: the walk only goes backwards
    // from pointer to pointer, so it ends.
    let mut lowest = start;
    let mut end = None;
    let mut hops = 0;
    loop {
        let len = *msg.get(at).ok_or(WireError::Truncated)?;
        match len & 0xc0 {
            0x00 if len == 0 => {
                wire.push(0);
                return Ok((Name { wire }, end.unwrap_or(at + 1)));
            }
            0x00 => {
                let label = msg
                    .get(at + 1..at + 1 + usize::from(len))
                    .ok_or(WireError::Truncated)?;
                // The label, its length byte, and the root still to come.
                if wire.len() + label.len() + 2 > MAX_NAME_LEN {
                    return Err(WireError::NameTooLong);
                }
                wire.push(len);
                wire.extend_from_slice(label);
                at += 1 + label.len();
            }
            0xc0 => {
                let low = *msg.get(at + 1).ok_or(WireError::Truncated)?;
                let target = usize::from(u16::from_be_bytes([len & 0x3f, low]));
                hops += 1;
                if target >= lowest || hops > MAX_POINTER_HOPS {
                    return Err(WireError::BadPointer);
                }
                end.get_or_insert(at + 2);
                lowest = target;
                at = target;
            }
            _ => return Err(WireError::BadLabel),
        }
    }
}

fn read_u16(msg: &[u8], at: usize) -> Result<u16, WireError> {
    match msg.get(at..at + 2) {
        Some(&[a, b]) => Ok(u16::from_be_bytes([a, b])),
        _ => Err(WireError::Truncated),
    }
}

/// A header-only response to `msg` (its id, opcode, `RD` and `CD` echoed) with `rcode`, for
/// queries that cannot be answered properly (malformed, unknown opcode); `None` if `msg` has no
/// header.
pub fn error_response(msg: &[u8], rcode: Rcode) -> Option<Vec<u8>> {
    if msg.len() < HEADER_LEN {
        return None;
    }
    let id = read_u16(msg, 0).ok()?;
    let flags = read_u16(msg, 2).ok()?;
    let flags = FLAG_QR | FLAG_RA | (flags & (OPCODE_BITS | FLAG_RD | FLAG_CD)) | (rcode.code() & 0xf);
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    Some(out)
}

/// `msg` if it fits in `limit` bytes, else its header and question section alone with the `TC`
/// flag set (just the header if its question cannot be read): for answers relayed from
/// upstreams.
pub fn truncated(mut msg: Vec<u8>, limit: usize) -> Vec<u8> {
    if msg.len() <= limit {
        return msg;
    }
    let (keep, questions) = read_question(&msg).map_or((HEADER_LEN, 0), |(_, end)| (end, 1));
    let flags = read_u16(&msg, 2).unwrap_or_default() | FLAG_TC;
    msg.truncate(keep);
    if let Some(header) = msg.get_mut(2..HEADER_LEN) {
        for (slot, word) in header.chunks_exact_mut(2).zip([flags, questions, 0, 0, 0]) {
            slot.copy_from_slice(&word.to_be_bytes());
        }
    }
    msg
}

/// The response to `query` with `reply`, at most `limit` bytes (at least 512 are assumed):
/// the question echoed as it was asked, answers and the SOA compressed against it, the OPT
/// record echoed (with this server's payload size) if the query had one. A response that
/// would not fit is sent as its header and question with the `TC` flag set and no records.
pub fn encode_response(query: &Query, reply: &Reply, limit: usize) -> Vec<u8> {
    let limit = limit.clamp(UDP_LIMIT, TCP_LIMIT);
    let mut out = Vec::with_capacity(512);
    let full = Encoder {
        query,
        reply,
        out: &mut out,
    }
    .full();
    if full.is_ok() && out.len() <= limit {
        return out;
    }
    out.clear();
    Encoder {
        query,
        reply,
        out: &mut out,
    }
    .truncated();
    out
}

/// The record would not fit in a DNS message (a count or length over 65535).
struct TooBig;

struct Encoder<'a> {
    query: &'a Query,
    reply: &'a Reply,
    out: &'a mut Vec<u8>,
}

impl Encoder<'_> {
    fn full(&mut self) -> Result<(), TooBig> {
        let answers = u16::try_from(self.reply.answers.len()).map_err(|_| TooBig)?;
        let authority = u16::from(self.reply.soa.is_some());
        self.header(false, answers, authority);
        self.question();
        for data in &self.reply.answers {
            self.out.extend_from_slice(&(0xc000 | QUESTION_AT).to_be_bytes());
            self.record(data)?;
        }
        if let Some(soa) = &self.reply.soa {
            self.name(&soa.zone);
            self.record(&RData::Soa(soa.clone()))?;
        }
        self.opt();
        Ok(())
    }

    fn truncated(&mut self) {
        self.header(true, 0, 0);
        self.question();
        self.opt();
    }

    fn header(&mut self, tc: bool, answers: u16, authority: u16) {
        let q = self.query;
        let mut flags =
            FLAG_QR | FLAG_RA | (u16::from(q.opcode & 0xf) << 11) | (self.reply.rcode.code() & 0xf);
        for (on, flag) in [
            (self.reply.authoritative, FLAG_AA),
            (tc, FLAG_TC),
            (q.rd, FLAG_RD),
            (q.cd, FLAG_CD),
        ] {
            if on {
                flags |= flag;
            }
        }
        let additional = u16::from(q.edns.is_some());
        for word in [q.id, flags, 1, answers, authority, additional] {
            self.out.extend_from_slice(&word.to_be_bytes());
        }
    }

    fn question(&mut self) {
        let q = &self.query.question;
        self.out.extend_from_slice(q.name.as_wire());
        self.out.extend_from_slice(&q.qtype.to_be_bytes());
        self.out.extend_from_slice(&q.qclass.to_be_bytes());
    }

    fn opt(&mut self) {
        let Some(edns) = self.query.edns else {
            return;
        };
        let ext = u8::try_from(self.reply.rcode.code() >> 4).unwrap_or_default();
        let ttl = u32::from(ext) << 24 | if edns.dnssec_ok { EDNS_DO } else { 0 };
        self.out.push(0);
        self.out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        self.out.extend_from_slice(&EDNS_PAYLOAD.to_be_bytes());
        self.out.extend_from_slice(&ttl.to_be_bytes());
        self.out.extend_from_slice(&0_u16.to_be_bytes());
    }

    /// Type, class, TTL, length and data of a record whose owner was just written.
    fn record(&mut self, data: &RData) -> Result<(), TooBig> {
        self.out.extend_from_slice(&data.rtype().to_be_bytes());
        self.out.extend_from_slice(&CLASS_IN.to_be_bytes());
        self.out.extend_from_slice(&self.reply.ttl.to_be_bytes());
        let len_at = self.out.len();
        self.out.extend_from_slice(&[0, 0]);
        match data {
            RData::A(ip) => self.out.extend_from_slice(&ip.octets()),
            RData::Aaaa(ip) => self.out.extend_from_slice(&ip.octets()),
            RData::Txt(text) if text.is_empty() => self.out.push(0),
            RData::Txt(text) => {
                for chunk in text.chunks(255) {
                    self.out.push(u8::try_from(chunk.len()).map_err(|_| TooBig)?);
                    self.out.extend_from_slice(chunk);
                }
            }
            RData::Soa(soa) => {
                self.name(&soa.mname);
                self.name(&soa.rname);
                for n in [soa.serial, soa.refresh, soa.retry, soa.expire, soa.minimum] {
                    self.out.extend_from_slice(&n.to_be_bytes());
                }
            }
        }
        let len = u16::try_from(self.out.len() - len_at - 2).map_err(|_| TooBig)?;
        self.out[len_at..len_at + 2].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }

    /// Writes `name`, its longest suffix that ends the question's name as a pointer there.
    fn name(&mut self, name: &Name) {
        let asked = &self.query.question.name;
        for at in name.suffix_offsets() {
            let suffix = &name.wire[at..];
            if suffix == [0] {
                break;
            }
            let found = asked
                .suffix_offsets()
                .find(|&q| asked.wire[q..].eq_ignore_ascii_case(suffix))
                .and_then(|q| u16::try_from(q).ok());
            if let Some(q) = found {
                self.out.extend_from_slice(&name.wire[..at]);
                self.out
                    .extend_from_slice(&(0xc000 | (QUESTION_AT + q)).to_be_bytes());
                return;
            }
        }
        self.out.extend_from_slice(&name.wire);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use proptest::prelude::*;

    use super::*;

    /// `id 0xbeef, RD, 1 question` + `App.Internal AAAA IN`.
    fn query_bytes() -> Vec<u8> {
        let mut q = vec![0xbe, 0xef, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x03App\x08Internal\x00\x00\x1c\x00\x01");
        q
    }

    fn with_opt(mut q: Vec<u8>, size: u16, flags: [u8; 2]) -> Vec<u8> {
        q[11] = 1;
        q.extend_from_slice(&[0, 0, 41]);
        q.extend_from_slice(&size.to_be_bytes());
        q.extend_from_slice(&[0, 0, flags[0], flags[1], 0, 0]);
        q
    }

    #[test]
    fn a_plain_query_parses() {
        let q = parse_query(&query_bytes()).unwrap();
        assert_eq!(q.id, 0xbeef);
        assert_eq!(q.opcode, OPCODE_QUERY);
        assert!(q.rd && !q.cd);
        assert_eq!(q.question.name.as_wire(), b"\x03App\x08Internal\x00");
        assert_eq!(q.question.name.to_string(), "App.Internal.");
        let labels: Vec<&[u8]> = q.question.name.labels().collect();
        assert_eq!(labels, [&b"App"[..], b"Internal"]);
        assert_eq!((q.question.qtype, q.question.qclass), (TYPE_AAAA, CLASS_IN));
        assert_eq!(q.edns, None);
        assert_eq!(q.udp_limit(), 512);
    }

    #[test]
    fn the_opt_record_gives_the_payload_size_and_do_bit() {
        let q = parse_query(&with_opt(query_bytes(), 4096, [0x80, 0])).unwrap();
        let edns = q.edns.unwrap();
        assert_eq!((edns.payload_size, edns.version, edns.dnssec_ok), (4096, 0, true));
        assert_eq!(q.udp_limit(), 1232);
        let small = parse_query(&with_opt(query_bytes(), 100, [0, 0])).unwrap();
        assert_eq!(small.udp_limit(), 512);
        let mid = parse_query(&with_opt(query_bytes(), 1000, [0, 0])).unwrap();
        assert_eq!(mid.udp_limit(), 1000);
    }

    #[test]
    fn malformed_queries_are_errors() {
        let q = query_bytes();
        assert_eq!(parse_query(&q[..11]), Err(WireError::Truncated));
        assert_eq!(parse_query(&q[..q.len() - 1]), Err(WireError::Truncated));
        let mut two = q.clone();
        two[5] = 2;
        assert_eq!(parse_query(&two), Err(WireError::QuestionCount(2)));
        let mut none = q.clone();
        none[5] = 0;
        assert_eq!(parse_query(&none), Err(WireError::QuestionCount(0)));
        // An additional record that runs past the end.
        let mut ar = q.clone();
        ar[11] = 1;
        ar.extend_from_slice(&[0, 0, 41, 0x10]);
        assert_eq!(parse_query(&ar), Err(WireError::Truncated));
        // Two OPT records; an OPT record with an owner.
        let twice = with_opt(with_opt(q.clone(), 512, [0, 0]), 512, [0, 0]);
        let mut twice = twice;
        twice[11] = 2;
        assert_eq!(parse_query(&twice), Err(WireError::BadOpt));
        let mut owned = q.clone();
        owned[11] = 1;
        owned.extend_from_slice(&[1, b'x', 0, 0, 41, 2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(parse_query(&owned), Err(WireError::BadOpt));
        // An extended label type (0b01).
        let mut ext = q;
        ext[12] = 0x41;
        assert_eq!(parse_query(&ext), Err(WireError::BadLabel));
    }

    #[test]
    fn compression_pointers_are_followed_backwards_only() {
        // Header, question `x.a.` (a pointer-free name), then an additional record owned by
        // `y` + pointer to `a.` in the question (offset 14): valid.
        let mut q = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1];
        q.extend_from_slice(b"\x01x\x01a\x00\x00\x10\x00\x01");
        q.extend_from_slice(b"\x01y\xc0\x0e\x00\x10\x00\x01\x00\x00\x00\x00\x00\x00");
        assert!(parse_query(&q).is_ok());
        let (name, end) = read_name(&q, 21).unwrap();
        assert_eq!((name.to_string().as_str(), end), ("y.a.", 25));
        // A pointer to itself, and to a later byte.
        let mut own = q.clone();
        own[23..25].copy_from_slice(&[0xc0, 23]);
        assert_eq!(parse_query(&own), Err(WireError::BadPointer));
        let mut forward = q.clone();
        forward[23..25].copy_from_slice(&[0xc0, 30]);
        assert_eq!(parse_query(&forward), Err(WireError::BadPointer));
        // The question's own name pointing at its first label: `\x01x` then a pointer to 12.
        let mut looped = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        looped.extend_from_slice(b"\x01x\xc0\x0c\x00\x01\x00\x01");
        assert_eq!(parse_query(&looped), Err(WireError::BadPointer));
        // A pointer in the header's place of the question (target below 12) is "backwards":
        // it reads the header's bytes as labels, which here end in the root.
        let mut header_ptr = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        header_ptr.extend_from_slice(b"\xc0\x02\x00\x01\x00\x01");
        assert_eq!(parse_query(&header_ptr).unwrap().question.name, Name::root());
    }

    #[test]
    fn names_longer_than_255_bytes_are_refused() {
        let mut q = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for _ in 0..4 {
            q.push(63);
            q.extend_from_slice(&[b'a'; 63]);
        }
        // 4 × 64 bytes = 256 already.
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert_eq!(parse_query(&q), Err(WireError::NameTooLong));
        let long = vec!["a".repeat(63); 4].join(".");
        assert_eq!(Name::from_text(&long), Err(WireError::NameTooLong));
        assert_eq!(Name::from_text(&long[2..]).unwrap().as_wire().len(), 255);
        assert_eq!(Name::from_text("a..b"), Err(WireError::BadText));
        assert_eq!(Name::from_text(&"a".repeat(64)), Err(WireError::BadText));
        assert_eq!(Name::from_text(".").unwrap(), Name::root());
    }

    #[test]
    fn an_answer_echoes_the_question_and_compresses_owners() {
        let q = parse_query(&query_bytes()).unwrap();
        let reply = Reply {
            rcode: Rcode::NoError,
            authoritative: true,
            answers: vec![RData::Aaaa("fdaa::1".parse().unwrap())],
            soa: None,
            ttl: 5,
        };
        let msg = encode_response(&q, &reply, 512);
        let mut want = vec![0xbe, 0xef, 0x85, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        want.extend_from_slice(b"\x03App\x08Internal\x00\x00\x1c\x00\x01");
        want.extend_from_slice(&[0xc0, 0x0c, 0, 28, 0, 1, 0, 0, 0, 5, 0, 16]);
        want.extend_from_slice(&[0xfd, 0xaa, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(msg, want);
        assert_eq!(id(&msg), Some(0xbeef));
        assert!(is_response(&msg) && same_question(&query_bytes(), &msg));
    }

    #[test]
    fn a_negative_answer_carries_the_soa_compressed_against_the_question() {
        let q = parse_query(&with_opt(query_bytes(), 4096, [0x80, 0])).unwrap();
        let soa = Soa {
            zone: Name::from_text("internal").unwrap(),
            mname: Name::from_text("ns.internal").unwrap(),
            rname: Name::from_text("hostmaster.internal").unwrap(),
            serial: 7,
            refresh: 1,
            retry: 2,
            expire: 3,
            minimum: 5,
        };
        let reply = Reply {
            rcode: Rcode::NxDomain,
            authoritative: true,
            answers: Vec::new(),
            soa: Some(soa),
            ttl: 5,
        };
        let msg = encode_response(&q, &reply, 1232);
        let mut want = vec![0xbe, 0xef, 0x85, 0x83, 0, 1, 0, 0, 0, 1, 0, 1];
        want.extend_from_slice(b"\x03App\x08Internal\x00\x00\x1c\x00\x01");
        // `internal` is the question's suffix at 12 + 4.
        want.extend_from_slice(&[0xc0, 16, 0, 6, 0, 1, 0, 0, 0, 5, 0, 38]);
        want.extend_from_slice(b"\x02ns\xc0\x10\x0ahostmaster\xc0\x10");
        for n in [7_u32, 1, 2, 3, 5] {
            want.extend_from_slice(&n.to_be_bytes());
        }
        // OPT: root, type 41, our 1232, DO echoed.
        want.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0x80, 0, 0, 0]);
        assert_eq!(msg, want);
    }

    #[test]
    fn txt_is_split_into_255_byte_strings_in_one_record() {
        let q = parse_query(&query_bytes()).unwrap();
        let text: Vec<u8> = (0..600_u32)
            .map(|i| b'a' + u8::try_from(i % 26).unwrap())
            .collect();
        let reply = Reply {
            rcode: Rcode::NoError,
            authoritative: true,
            answers: vec![RData::Txt(text.clone())],
            soa: None,
            ttl: 5,
        };
        let msg = encode_response(&q, &reply, TCP_LIMIT);
        assert_eq!(&msg[6..8], &[0, 1]);
        // Header, question (14 + 4), owner pointer, type, class, TTL, length.
        let rdata_at = 12 + 18 + 12;
        assert_eq!(&msg[rdata_at - 2..rdata_at], &603_u16.to_be_bytes());
        let rdata = &msg[rdata_at..];
        assert_eq!(rdata.len(), 603);
        assert_eq!(rdata[0], 255);
        assert_eq!(rdata[256], 255);
        assert_eq!(rdata[512], 90);
        let joined: Vec<u8> = [&rdata[1..256], &rdata[257..512], &rdata[513..]].concat();
        assert_eq!(joined, text);
    }

    #[test]
    fn an_answer_over_the_limit_is_truncated_to_its_question() {
        let q = parse_query(&with_opt(query_bytes(), 1232, [0, 0])).unwrap();
        let answers = (0..60_u16)
            .map(|i| RData::Aaaa(Ipv6Addr::new(0xfdaa, 0, 0, 0, 0, 0, 0, i)))
            .collect();
        let reply = Reply {
            rcode: Rcode::NoError,
            authoritative: true,
            answers,
            soa: None,
            ttl: 5,
        };
        let big = encode_response(&q, &reply, TCP_LIMIT);
        assert_eq!(big.len(), 12 + 18 + 60 * 28 + 11);
        let small = encode_response(&q, &reply, q.udp_limit());
        let mut want = vec![0xbe, 0xef, 0x87, 0x80, 0, 1, 0, 0, 0, 0, 0, 1];
        want.extend_from_slice(b"\x03App\x08Internal\x00\x00\x1c\x00\x01");
        want.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(small, want);
        // A relayed answer is cut the same way.
        let cut = truncated(big.clone(), 512);
        assert_eq!(
            cut[..HEADER_LEN],
            [0xbe, 0xef, 0x87, 0x80, 0, 1, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(cut.len(), 12 + 18);
        assert_eq!(truncated(big.clone(), TCP_LIMIT), big);
    }

    #[test]
    fn error_responses_echo_the_header() {
        let mut q = query_bytes();
        q[2] |= 0x28; // opcode 5 (UPDATE)
        assert_eq!(opcode(&q), Some(5));
        let msg = error_response(&q, Rcode::NotImp).unwrap();
        assert_eq!(msg, [0xbe, 0xef, 0xa9, 0x84, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(error_response(&q[..11], Rcode::FormErr), None);
        let q = parse_query(&with_opt(query_bytes(), 512, [0, 0])).unwrap();
        let bad = encode_response(&q, &Reply::error(Rcode::BadVers), 512);
        // BADVERS: 0 in the header, 1 in the OPT record's extended rcode.
        assert_eq!(bad[3], 0x80);
        assert_eq!(bad[bad.len() - 6], 1);
    }

    #[test]
    fn ids_are_read_and_rewritten() {
        let mut q = query_bytes();
        set_id(&mut q, 0x1234);
        assert_eq!(id(&q), Some(0x1234));
        assert_eq!(&q[..2], &[0x12, 0x34]);
        let mut short = vec![1];
        set_id(&mut short, 7);
        assert_eq!((short, id(&[1])), (vec![1], None));
    }

    #[test]
    fn questions_compare_ignoring_case_only() {
        let q = query_bytes();
        let mut lower = q.clone();
        lower[13..16].copy_from_slice(b"app");
        assert!(same_question(&q, &lower));
        let mut other_type = q.clone();
        let at = q.len() - 3;
        other_type[at] = 1;
        assert!(!same_question(&q, &other_type));
        let mut other_name = q.clone();
        other_name[13] = b'B';
        assert!(!same_question(&q, &other_name));
        assert!(!same_question(&q, &q[..20]));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_query(&bytes);
            let _ = question(&bytes);
            let _ = same_question(&bytes, &bytes);
            let _ = error_response(&bytes, Rcode::FormErr);
            let _ = truncated(bytes.clone(), 512);
            if let Ok(q) = parse_query(&bytes) {
                let msg = encode_response(&q, &Reply::error(Rcode::ServFail), 512);
                prop_assert!(msg.len() <= 512);
                prop_assert!(same_question(&bytes, &msg));
            }
        }

        #[test]
        fn a_valid_header_with_arbitrary_rest_never_panics(
            rest in proptest::collection::vec(any::<u8>(), 0..300),
            counts in any::<[u8; 3]>(),
        ) {
            let mut msg = vec![0, 1, 0, 0, 0, 1, 0, counts[0], 0, counts[1], 0, counts[2]];
            msg.extend_from_slice(&rest);
            let _ = parse_query(&msg);
        }
    }
}
