//! Index attributes read from a received dataset without trusting it.
//!
//! The walker checks every element length against the bytes actually present
//! before reading or skipping, bounds sequence nesting, and walks to the end
//! of the dataset (skipping pixel data without reading it), so a truncated or
//! forged dataset is refused before anything is indexed. Only the few values
//! the index needs are ever held in memory, each at most 64 KiB.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use dicom_encoding::text::{SpecificCharacterSet, TextCodec};

/// Why a dataset cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatasetError {
    #[error("dataset ends inside an element (truncated)")]
    Truncated,
    #[error(
        "element ({group:04X},{element:04X}) claims {length} bytes but only {available} remain"
    )]
    BadLength {
        group: u16,
        element: u16,
        length: u64,
        available: u64,
    },
    #[error("sequences nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("malformed dataset: {0}")]
    Malformed(&'static str),
    #[error("required attribute {0} is missing or invalid")]
    MissingAttribute(&'static str),
    #[error("{attribute} in the dataset ({dataset}) differs from the command ({command})")]
    Mismatch {
        attribute: &'static str,
        dataset: String,
        command: String,
    },
    /// The center could not read its own spool file (descriptors, disk):
    /// its failure, not the sender's, so the sender may try again.
    #[error("cannot read spooled dataset: {0}")]
    Io(String),
    /// A deflated dataset that inflates beyond the size limit (a
    /// decompression bomb, or simply too large once inflated).
    #[error("deflated dataset inflates beyond the limit of {limit} bytes")]
    InflatesBeyond { limit: u64 },
}

impl DatasetError {
    /// True when the dataset is well formed but does not match its SOP class
    /// or command (DIMSE 0xA900 rather than 0xC000).
    pub fn is_mismatch(&self) -> bool {
        matches!(
            self,
            DatasetError::MissingAttribute(_) | DatasetError::Mismatch { .. }
        )
    }
}

/// Deepest sequence nesting accepted.
pub const MAX_DEPTH: u32 = 32;
/// Largest value kept for the index; longer values of index tags are ignored.
const MAX_KEPT_VALUE: u64 = 64 * 1024;
const UNDEFINED: u32 = 0xFFFF_FFFF;
const ITEM: u32 = 0xFFFE_E000;
const ITEM_DELIMITATION: u32 = 0xFFFE_E00D;
const SEQUENCE_DELIMITATION: u32 = 0xFFFE_E0DD;
const PIXEL_DATA: u32 = 0x7FE0_0010;
const OTHER_PATIENT_IDS_SEQUENCE: u32 = 0x0010_1002;

/// How a dataset is encoded, from its transfer syntax UID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatasetEncoding {
    pub explicit_vr: bool,
    pub big_endian: bool,
    pub deflated: bool,
}

impl DatasetEncoding {
    pub fn for_transfer_syntax(uid: &str) -> DatasetEncoding {
        let (explicit_vr, big_endian, deflated) = match uid {
            "1.2.840.10008.1.2" => (false, false, false),
            "1.2.840.10008.1.2.2" => (true, true, false),
            "1.2.840.10008.1.2.1.99" | "1.2.840.10008.1.2.4.95" => (true, false, true),
            _ => (true, false, false),
        };
        DatasetEncoding {
            explicit_vr,
            big_endian,
            deflated,
        }
    }
}

/// One entry of Other Patient IDs Sequence (e.g. a resident ID number).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtherPatientId {
    pub id: String,
    pub issuer: String,
    pub type_of_id: String,
}

/// A person name as received and as text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PersonName {
    /// Bytes as received, in the dataset's Specific Character Set.
    pub raw: Vec<u8>,
    /// Decoded to Unicode.
    pub text: String,
}

/// The attributes the index keeps for one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceAttrs {
    pub specific_character_set: String,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub patient_name: PersonName,
    pub patient_id: String,
    pub issuer_of_patient_id: String,
    pub patient_birth_date: String,
    pub patient_sex: String,
    pub other_patient_ids: Vec<OtherPatientId>,
    pub study_date: String,
    pub study_time: String,
    pub accession_number: String,
    pub study_id: String,
    pub study_description: String,
    pub referring_physician_name: String,
    pub institution_name: String,
    pub modality: String,
    pub series_number: Option<i64>,
    pub series_description: String,
    pub instance_number: Option<i64>,
    pub number_of_frames: Option<i64>,
    /// Requested Procedure Priority (0040,1003): STAT, HIGH, ROUTINE, MEDIUM, LOW.
    pub requested_priority: String,
}

/// Reads the index attributes of the dataset starting at `offset` in `path`.
/// A deflated dataset is inflated (and walked to its end) only up to
/// `max_inflated` bytes.
pub fn read_file(
    path: &Path,
    offset: u64,
    transfer_syntax: &str,
    max_inflated: u64,
) -> Result<InstanceAttrs, DatasetError> {
    let io = |e: std::io::Error| DatasetError::Io(e.to_string());
    let mut file = File::open(path).map_err(io)?;
    let total = file.metadata().map_err(io)?.len();
    if offset > total {
        return Err(DatasetError::Truncated);
    }
    file.seek(SeekFrom::Start(offset)).map_err(io)?;
    let encoding = DatasetEncoding::for_transfer_syntax(transfer_syntax);
    let mut collector = Collector::default();
    if encoding.deflated {
        let inflater = flate2::read::DeflateDecoder::new(BufReader::with_capacity(64 * 1024, file));
        let source = StreamSource::new(BufReader::new(inflater), max_inflated);
        let mut walker = Walker::new(source, None, encoding);
        walker.walk_dataset(None, 0, None, &mut collector)?;
    } else {
        // A header is a few KiB: one read of 16 KiB usually holds it all.
        let reader = BufReader::with_capacity(16 * 1024, file);
        let mut walker = Walker::new(FileSource(reader), Some(total - offset), encoding);
        walker.walk_dataset(None, 0, None, &mut collector)?;
    }
    collector.finish()
}

/// Reads the index attributes of an in-memory dataset (tests, tools).
pub fn read_bytes(dataset: &[u8], transfer_syntax: &str) -> Result<InstanceAttrs, DatasetError> {
    let mut collector = Collector::default();
    walk_bytes(dataset, transfer_syntax, &mut collector)?;
    collector.finish()
}

/// The top-level values of a small dataset (a query identifier, already
/// [`validate`]d) as text, each decoded whole in the dataset's own Specific
/// Character Set, code extensions included. A general parser that splits
/// values at 0x5C before decoding cuts GB18030 characters whose second
/// byte is 0x5C (昞 is 95 5C) into two values; here a `\` in the text is a
/// real delimiter. Values longer than the index keeps are left out.
pub fn top_level_text(
    dataset: &[u8],
    transfer_syntax: &str,
) -> Result<Vec<(u32, String)>, DatasetError> {
    let mut collector = Collector {
        all_top: true,
        ..Collector::default()
    };
    walk_bytes(dataset, transfer_syntax, &mut collector)?;
    let code = collector
        .top
        .iter()
        .find(|(t, _)| *t == 0x0008_0005)
        .map(|(_, v)| ascii(v))
        .unwrap_or_default();
    let charset = Charset::of(&code);
    Ok(collector
        .top
        .iter()
        .map(|(tag, v)| (*tag, decode(&charset, v)))
        .collect())
}

/// Checks that `dataset` is structurally sound (every length within the
/// bytes present, nesting bounded, nothing truncated) without requiring any
/// attribute: for small datasets such as query identifiers and commitment
/// requests, before a general-purpose parser allocates from their lengths.
pub fn validate(dataset: &[u8], transfer_syntax: &str) -> Result<(), DatasetError> {
    walk_bytes(dataset, transfer_syntax, &mut Collector::default())
}

/// How far an in-memory deflated dataset (a query identifier, a
/// commitment request, a test's dataset) may inflate: a few KiB deflated
/// must not become gigabytes to walk.
const MAX_INFLATED_IN_MEMORY: u64 = 64 << 20;

fn walk_bytes(
    dataset: &[u8],
    transfer_syntax: &str,
    collector: &mut Collector,
) -> Result<(), DatasetError> {
    let encoding = DatasetEncoding::for_transfer_syntax(transfer_syntax);
    if encoding.deflated {
        let inflater = flate2::read::DeflateDecoder::new(dataset);
        let source = StreamSource::new(BufReader::new(inflater), MAX_INFLATED_IN_MEMORY);
        Walker::new(source, None, encoding).walk_dataset(None, 0, None, collector)
    } else {
        let cursor = std::io::Cursor::new(dataset);
        Walker::new(SliceSource(cursor), Some(dataset.len() as u64), encoding)
            .walk_dataset(None, 0, None, collector)
    }
}

trait Source {
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), DatasetError>;
    fn skip(&mut self, n: u64) -> Result<(), DatasetError>;
    /// True when no byte is left (sources of unknown length).
    fn at_end(&mut self) -> Result<bool, DatasetError> {
        Ok(false)
    }
}

/// A seekable source whose length is known (the spooled file).
struct FileSource(BufReader<File>);

impl Source for FileSource {
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), DatasetError> {
        self.0.read_exact(buf).map_err(eof_as_truncated)
    }
    fn skip(&mut self, n: u64) -> Result<(), DatasetError> {
        // The walker has already checked `n` against the remaining length.
        let n = i64::try_from(n).map_err(|_| DatasetError::Truncated)?;
        // Within the buffer, a skip moves a cursor. `seek` would drop the
        // buffer and read it again: it cost about 60 reads and 60 seeks of
        // 64 KiB per header, for every instance received.
        self.0
            .seek_relative(n)
            .map_err(|e| DatasetError::Io(e.to_string()))
    }
}

/// An in-memory dataset.
struct SliceSource<'a>(std::io::Cursor<&'a [u8]>);

impl Source for SliceSource<'_> {
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), DatasetError> {
        self.0.read_exact(buf).map_err(eof_as_truncated)
    }
    fn skip(&mut self, n: u64) -> Result<(), DatasetError> {
        // The walker has already checked `n` against the remaining length.
        let to = self.0.position().saturating_add(n);
        self.0.set_position(to);
        Ok(())
    }
}

/// A forward-only source of unknown length (an inflating reader), read up
/// to `limit` bytes.
struct StreamSource<R> {
    reader: R,
    read: u64,
    limit: u64,
}

impl<R> StreamSource<R> {
    fn new(reader: R, limit: u64) -> Self {
        StreamSource {
            reader,
            read: 0,
            limit,
        }
    }
}

impl<R: std::io::BufRead> StreamSource<R> {
    /// Inflates and drops `n` bytes, no more than the limit allows: past it,
    /// a stream with bytes left inflates beyond the limit; one that ends
    /// first is truncated (a garbled length, not a bomb).
    fn consume(&mut self, n: u64) -> Result<(), DatasetError> {
        let allowed = n.min(self.limit - self.read);
        let copied = std::io::copy(&mut (&mut self.reader).take(allowed), &mut std::io::sink())
            .map_err(eof_as_truncated)?;
        self.read += copied;
        if copied < allowed {
            return Err(DatasetError::Truncated);
        }
        if allowed < n {
            return Err(if self.at_end()? {
                DatasetError::Truncated
            } else {
                DatasetError::InflatesBeyond { limit: self.limit }
            });
        }
        Ok(())
    }
}

impl<R: std::io::BufRead> Source for StreamSource<R> {
    fn at_end(&mut self) -> Result<bool, DatasetError> {
        Ok(self.reader.fill_buf().map_err(eof_as_truncated)?.is_empty())
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), DatasetError> {
        if buf.len() as u64 > self.limit - self.read {
            return self.consume(buf.len() as u64);
        }
        self.reader.read_exact(buf).map_err(eof_as_truncated)?;
        self.read += buf.len() as u64;
        Ok(())
    }
    fn skip(&mut self, n: u64) -> Result<(), DatasetError> {
        self.consume(n)
    }
}

/// What a failed read of the dataset means: the sender's bytes end early
/// or do not inflate (a corrupt deflate stream), or the center could not
/// read its own spool file.
fn eof_as_truncated(e: std::io::Error) -> DatasetError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => DatasetError::Truncated,
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput => {
            DatasetError::Malformed("the deflated dataset does not inflate")
        }
        _ => DatasetError::Io(e.to_string()),
    }
}

struct ElementHeader {
    tag: u32,
    vr: Option<[u8; 2]>,
    length: u32,
}

struct Walker<S> {
    src: S,
    /// Bytes in the dataset, when known.
    total: Option<u64>,
    pos: u64,
    encoding: DatasetEncoding,
}

impl<S: Source> Walker<S> {
    fn new(src: S, total: Option<u64>, encoding: DatasetEncoding) -> Self {
        Walker {
            src,
            total,
            pos: 0,
            encoding,
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<(), DatasetError> {
        self.src.read_exact(buf)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn u16(&self, b: [u8; 2]) -> u16 {
        if self.encoding.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    }

    fn u32(&self, b: [u8; 4]) -> u32 {
        if self.encoding.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }

    /// Reads the next element header; `None` at a clean end of data when allowed.
    fn read_header(&mut self, eof_ok: bool) -> Result<Option<ElementHeader>, DatasetError> {
        let mut tag_bytes = [0u8; 4];
        if eof_ok && self.total.is_some_and(|t| self.pos == t) {
            return Ok(None);
        }
        // A stream source ends cleanly only where the deflate stream itself
        // ends, between two elements; anything else is a truncation.
        if eof_ok && self.total.is_none() && self.src.at_end()? {
            return Ok(None);
        }
        self.read(&mut tag_bytes)?;
        let group = self.u16([tag_bytes[0], tag_bytes[1]]);
        let element = self.u16([tag_bytes[2], tag_bytes[3]]);
        let tag = (u32::from(group) << 16) | u32::from(element);
        if group == 0xFFFE || !self.encoding.explicit_vr {
            let mut len = [0u8; 4];
            self.read(&mut len)?;
            return Ok(Some(ElementHeader {
                tag,
                vr: None,
                length: self.u32(len),
            }));
        }
        let mut vr = [0u8; 2];
        self.read(&mut vr)?;
        if !vr.iter().all(u8::is_ascii_uppercase) {
            return Err(DatasetError::Malformed("invalid value representation"));
        }
        let long = matches!(
            &vr,
            b"OB"
                | b"OD"
                | b"OF"
                | b"OL"
                | b"OV"
                | b"OW"
                | b"SQ"
                | b"SV"
                | b"UC"
                | b"UN"
                | b"UR"
                | b"UT"
                | b"UV"
        );
        let length = if long {
            let mut rest = [0u8; 6];
            self.read(&mut rest)?;
            self.u32([rest[2], rest[3], rest[4], rest[5]])
        } else {
            let mut len = [0u8; 2];
            self.read(&mut len)?;
            u32::from(self.u16(len))
        };
        Ok(Some(ElementHeader {
            tag,
            vr: Some(vr),
            length,
        }))
    }

    fn check_available(&self, tag: u32, length: u64, end: Option<u64>) -> Result<(), DatasetError> {
        let limit = match (end, self.total) {
            (Some(e), Some(t)) => Some(e.min(t)),
            (e, t) => e.or(t),
        };
        if let Some(limit) = limit {
            let available = limit.saturating_sub(self.pos);
            if length > available {
                return Err(DatasetError::BadLength {
                    group: (tag >> 16) as u16,
                    element: tag as u16,
                    length,
                    available,
                });
            }
        }
        Ok(())
    }

    /// Walks a dataset (the top level, or one item) until `end`, an item
    /// delimiter (undefined-length items) or the end of data (top level).
    fn walk_dataset(
        &mut self,
        end: Option<u64>,
        depth: u32,
        parent: Option<u32>,
        out: &mut Collector,
    ) -> Result<(), DatasetError> {
        loop {
            if end == Some(self.pos) {
                return Ok(());
            }
            let top = depth == 0;
            let Some(h) = self.read_header(top)? else {
                return Ok(());
            };
            match h.tag {
                ITEM_DELIMITATION if !top && end.is_none() => {
                    return if h.length == 0 {
                        Ok(())
                    } else {
                        Err(DatasetError::Malformed("item delimitation with a length"))
                    };
                }
                ITEM | ITEM_DELIMITATION | SEQUENCE_DELIMITATION => {
                    return Err(DatasetError::Malformed("unexpected delimiter"));
                }
                _ => {}
            }
            let is_sequence = match h.vr {
                Some(vr) => &vr == b"SQ" || (&vr == b"UN" && h.length == UNDEFINED),
                None => h.length == UNDEFINED || h.tag == OTHER_PATIENT_IDS_SEQUENCE,
            };
            if h.length == UNDEFINED {
                // Encapsulated pixel data, also inside an Icon Image Sequence (PS3.5 A.4).
                if h.tag == PIXEL_DATA {
                    self.walk_fragments()?;
                } else if is_sequence {
                    let saved = self.encoding;
                    if h.vr == Some(*b"UN") {
                        // PS3.5 6.2.2: undefined-length UN is implicit VR little endian.
                        self.encoding = DatasetEncoding::for_transfer_syntax("1.2.840.10008.1.2");
                    }
                    let res = self.walk_sequence(None, depth + 1, h.tag, out);
                    self.encoding = saved;
                    res?;
                } else {
                    return Err(DatasetError::Malformed(
                        "undefined length on a non-sequence element",
                    ));
                }
                continue;
            }
            let length = u64::from(h.length);
            self.check_available(h.tag, length, end)?;
            if is_sequence {
                let seq_end = self.pos + length;
                self.walk_sequence(Some(seq_end), depth + 1, h.tag, out)?;
                if self.pos != seq_end {
                    return Err(DatasetError::Malformed(
                        "sequence length does not match its items",
                    ));
                }
            } else if out.wants(depth, parent, h.tag) && length <= MAX_KEPT_VALUE {
                let mut value = vec![0u8; length as usize];
                self.read(&mut value)?;
                out.value(parent, h.tag, value);
            } else {
                self.src.skip(length)?;
                self.pos += length;
            }
        }
    }

    fn walk_sequence(
        &mut self,
        end: Option<u64>,
        depth: u32,
        tag: u32,
        out: &mut Collector,
    ) -> Result<(), DatasetError> {
        if depth > MAX_DEPTH {
            return Err(DatasetError::TooDeep);
        }
        loop {
            if end == Some(self.pos) {
                return Ok(());
            }
            let mut header = [0u8; 8];
            self.read(&mut header)?;
            let item_tag = (u32::from(self.u16([header[0], header[1]])) << 16)
                | u32::from(self.u16([header[2], header[3]]));
            let length = self.u32([header[4], header[5], header[6], header[7]]);
            match item_tag {
                ITEM => {
                    out.begin_item(tag);
                    if length == UNDEFINED {
                        self.walk_dataset(None, depth, Some(tag), out)?;
                    } else {
                        self.check_available(item_tag, u64::from(length), end)?;
                        let item_end = self.pos + u64::from(length);
                        self.walk_dataset(Some(item_end), depth, Some(tag), out)?;
                    }
                }
                SEQUENCE_DELIMITATION if end.is_none() => return Ok(()),
                _ => return Err(DatasetError::Malformed("expected an item in a sequence")),
            }
        }
    }

    /// Encapsulated pixel data: items of defined length up to a sequence delimiter.
    fn walk_fragments(&mut self) -> Result<(), DatasetError> {
        loop {
            let mut header = [0u8; 8];
            self.read(&mut header)?;
            let tag = (u32::from(self.u16([header[0], header[1]])) << 16)
                | u32::from(self.u16([header[2], header[3]]));
            let length = self.u32([header[4], header[5], header[6], header[7]]);
            match tag {
                SEQUENCE_DELIMITATION => return Ok(()),
                ITEM if length != UNDEFINED => {
                    self.check_available(tag, u64::from(length), None)?;
                    self.src.skip(u64::from(length))?;
                    self.pos += u64::from(length);
                }
                _ => {
                    return Err(DatasetError::Malformed(
                        "bad encapsulated pixel data fragment",
                    ));
                }
            }
        }
    }
}

/// Collects raw values of the tags the index needs.
#[derive(Default)]
struct Collector {
    top: Vec<(u32, Vec<u8>)>,
    other_ids: Vec<Vec<(u32, Vec<u8>)>>,
    /// The current Other Patient IDs item is one we keep.
    in_kept_item: bool,
    /// Every top-level element, not only [`TOP_TAGS`] (a query identifier).
    all_top: bool,
    /// The top-level tags kept, for `all_top` (a forged identifier may
    /// hold 100,000 elements: no linear search per element).
    top_seen: std::collections::HashSet<u32>,
}

const TOP_TAGS: &[u32] = &[
    0x0008_0005, // Specific Character Set
    0x0008_0016, // SOP Class UID
    0x0008_0018, // SOP Instance UID
    0x0008_0020, // Study Date
    0x0008_0030, // Study Time
    0x0008_0050, // Accession Number
    0x0008_0060, // Modality
    0x0008_0080, // Institution Name
    0x0008_0090, // Referring Physician's Name
    0x0008_1030, // Study Description
    0x0008_103E, // Series Description
    0x0010_0010, // Patient's Name
    0x0010_0020, // Patient ID
    0x0010_0021, // Issuer of Patient ID
    0x0010_0030, // Patient's Birth Date
    0x0010_0040, // Patient's Sex
    0x0010_1000, // Other Patient IDs (retired, still sent)
    0x0020_000D, // Study Instance UID
    0x0020_000E, // Series Instance UID
    0x0020_0010, // Study ID
    0x0020_0011, // Series Number
    0x0020_0013, // Instance Number
    0x0028_0008, // Number of Frames
    0x0040_1003, // Requested Procedure Priority
];

const OTHER_ID_TAGS: &[u32] = &[0x0010_0020, 0x0010_0021, 0x0010_0022];

/// Most Other Patient IDs kept; a forged dataset may hold millions.
const MAX_OTHER_IDS: usize = 64;

impl Collector {
    /// Only the first occurrence of each tag is kept, so what is held is
    /// bounded by the tag lists whatever the dataset repeats.
    fn wants(&self, depth: u32, parent: Option<u32>, tag: u32) -> bool {
        match (depth, parent) {
            (0, None) if self.all_top => !self.top_seen.contains(&tag),
            (0, None) => TOP_TAGS.contains(&tag) && !self.top.iter().any(|(t, _)| *t == tag),
            (1, Some(OTHER_PATIENT_IDS_SEQUENCE)) => {
                self.in_kept_item
                    && OTHER_ID_TAGS.contains(&tag)
                    && self
                        .other_ids
                        .last()
                        .is_some_and(|item| !item.iter().any(|(t, _)| *t == tag))
            }
            _ => false,
        }
    }

    fn begin_item(&mut self, sequence: u32) {
        self.in_kept_item =
            sequence == OTHER_PATIENT_IDS_SEQUENCE && self.other_ids.len() < MAX_OTHER_IDS;
        if self.in_kept_item {
            self.other_ids.push(Vec::new());
        }
    }

    fn value(&mut self, parent: Option<u32>, tag: u32, value: Vec<u8>) {
        match parent {
            None => {
                if self.all_top {
                    self.top_seen.insert(tag);
                }
                self.top.push((tag, value));
            }
            Some(_) => {
                if let Some(item) = self.other_ids.last_mut() {
                    item.push((tag, value));
                }
            }
        }
    }

    fn finish(self) -> Result<InstanceAttrs, DatasetError> {
        let raw = |tag: u32| -> &[u8] {
            self.top
                .iter()
                .find(|(t, _)| *t == tag)
                .map(|(_, v)| v.as_slice())
                .unwrap_or(&[])
        };
        let charset_code = ascii(raw(0x0008_0005));
        let charset = Charset::of(&charset_code);
        let text = |tag: u32| decode(&charset, raw(tag));
        let uid = |tag: u32, name: &'static str| -> Result<String, DatasetError> {
            let v = ascii(raw(tag));
            if crate::part10::is_valid_uid(&v) {
                Ok(v)
            } else {
                Err(DatasetError::MissingAttribute(name))
            }
        };
        let int = |tag: u32| ascii(raw(tag)).trim().parse::<i64>().ok();

        let mut other_patient_ids: Vec<OtherPatientId> = self
            .other_ids
            .iter()
            .map(|item| {
                let get = |tag: u32| {
                    item.iter()
                        .find(|(t, _)| *t == tag)
                        .map(|(_, v)| decode(&charset, v))
                        .unwrap_or_default()
                };
                OtherPatientId {
                    id: get(0x0010_0020),
                    issuer: get(0x0010_0021),
                    type_of_id: get(0x0010_0022),
                }
            })
            .filter(|o| !o.id.is_empty())
            .collect();
        let mut seen: std::collections::HashSet<String> =
            other_patient_ids.iter().map(|o| o.id.clone()).collect();
        for id in text(0x0010_1000).split('\\').filter(|s| !s.is_empty()) {
            if other_patient_ids.len() >= MAX_OTHER_IDS {
                break;
            }
            if seen.insert(id.to_string()) {
                other_patient_ids.push(OtherPatientId {
                    id: id.to_string(),
                    ..Default::default()
                });
            }
        }

        let name_raw = trim_padding(raw(0x0010_0010)).to_vec();
        Ok(InstanceAttrs {
            specific_character_set: charset_code,
            sop_class_uid: uid(0x0008_0016, "SOP Class UID")?,
            sop_instance_uid: uid(0x0008_0018, "SOP Instance UID")?,
            study_instance_uid: uid(0x0020_000D, "Study Instance UID")?,
            series_instance_uid: uid(0x0020_000E, "Series Instance UID")?,
            patient_name: PersonName {
                text: decode(&charset, &name_raw),
                raw: name_raw,
            },
            patient_id: text(0x0010_0020),
            issuer_of_patient_id: text(0x0010_0021),
            patient_birth_date: ascii(raw(0x0010_0030)),
            patient_sex: ascii(raw(0x0010_0040)),
            other_patient_ids,
            study_date: ascii(raw(0x0008_0020)),
            study_time: ascii(raw(0x0008_0030)),
            accession_number: text(0x0008_0050),
            study_id: text(0x0020_0010),
            study_description: text(0x0008_1030),
            referring_physician_name: text(0x0008_0090),
            institution_name: text(0x0008_0080),
            modality: ascii(raw(0x0008_0060)),
            series_number: int(0x0020_0011),
            series_description: text(0x0008_103E),
            instance_number: int(0x0020_0013),
            number_of_frames: int(0x0028_0008),
            requested_priority: ascii(raw(0x0040_1003)).to_ascii_uppercase(),
        })
    }
}

fn trim_padding(v: &[u8]) -> &[u8] {
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | 0))
        .map_or(0, |i| i + 1);
    let start = v.iter().position(|b| *b != b' ').unwrap_or(end);
    &v[start.min(end)..end]
}

fn ascii(v: &[u8]) -> String {
    String::from_utf8_lossy(trim_padding(v)).into_owned()
}

/// How a dataset's text is decoded, from its Specific Character Set.
///
/// With ISO 2022 code extensions (`\\ISO 2022 IR 58`, `ISO 2022 IR 6\\ISO
/// 2022 IR 149`, ...) the text switches repertoires with escape sequences.
/// One decoder is used for a whole value: the repertoire named after the
/// default one, the escape sequences removed; for Japanese (IR 87) the
/// ISO-2022-JP decoder, which reads them. A value mixing two non-ASCII
/// repertoires (Latin-1 with Greek, say) is decoded with the first.
struct Charset {
    codec: SpecificCharacterSet,
    strip_escapes: bool,
}

impl Charset {
    fn of(code: &str) -> Charset {
        const JAPANESE: &str = "ISO 2022 IR 87";
        let values: Vec<&str> = code.split('\\').map(str::trim).collect();
        let extended = values.iter().any(|v| v.starts_with("ISO 2022"));
        let named = if values.contains(&JAPANESE) {
            JAPANESE
        } else {
            values
                .iter()
                .copied()
                .find(|v| !v.is_empty() && *v != "ISO 2022 IR 6")
                .unwrap_or("")
        };
        Charset {
            codec: SpecificCharacterSet::from_code(named).unwrap_or_default(),
            strip_escapes: extended && named != JAPANESE,
        }
    }
}

fn decode(charset: &Charset, v: &[u8]) -> String {
    let v = trim_padding(v);
    let unescaped;
    let v = if charset.strip_escapes && v.contains(&0x1B) {
        unescaped = without_iso2022_escapes(v);
        unescaped.as_slice()
    } else {
        v
    };
    charset
        .codec
        .decode(v)
        .unwrap_or_else(|_| String::from_utf8_lossy(v).into_owned())
}

/// `v` without its ISO 2022 escape sequences (ESC, intermediate bytes
/// 0x20-0x2F, one final byte 0x30-0x7E).
fn without_iso2022_escapes(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == 0x1B {
            i += 1;
            while i < v.len() && (0x20..=0x2F).contains(&v[i]) {
                i += 1;
            }
            i += 1; // the final byte
        } else {
            out.push(v[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests;
