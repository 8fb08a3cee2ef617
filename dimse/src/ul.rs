//! DICOM Upper Layer framing (PS3.8 9.3) over a byte stream.
//!
//! dicom-ul encodes and decodes the PDUs; this module owns the framing so the
//! gateway controls what a peer can make it allocate: a PDU's length is
//! checked against the limit for its type before any buffer grows for it.
//! P-DATA-TF PDUs are split into PDVs here without copying.

use std::io::IoSlice;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use dicom_ul::pdu::{AbortRQServiceProviderReason, AbortRQSource, Pdu, read_pdu, write_pdu};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest non-P-DATA PDU accepted (an A-ASSOCIATE-RQ with ~128 contexts of
/// 10 transfer syntaxes each is about 40 KiB).
pub const MAX_CONTROL_PDU: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum UlError {
    #[error("unknown PDU type 0x{0:02X}")]
    UnknownPduType(u8),
    #[error("PDU of type 0x{pdu_type:02X} claims {length} bytes, limit is {limit}")]
    PduTooLarge {
        pdu_type: u8,
        length: u32,
        limit: u32,
    },
    #[error("malformed PDU: {0}")]
    Malformed(String),
    #[error("connection closed in the middle of a PDU")]
    UnexpectedEof,
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

impl UlError {
    /// The A-ABORT reason to send for this error, if the peer is still there.
    pub fn abort_reason(&self) -> Option<AbortRQServiceProviderReason> {
        match self {
            UlError::UnknownPduType(_) => Some(AbortRQServiceProviderReason::UnrecognizedPdu),
            UlError::PduTooLarge { .. } => Some(AbortRQServiceProviderReason::InvalidPduParameter),
            UlError::Malformed(_) => Some(AbortRQServiceProviderReason::InvalidPduParameter),
            UlError::UnexpectedEof | UlError::Io(_) => None,
        }
    }
}

/// A byte stream PDUs are read from.
///
/// A TCP stream acknowledges what it has read at once (`TCP_QUICKACK`)
/// before waiting for more. A peer with Nagle's algorithm on (Debian's
/// DCMTK unless `TCP_NODELAY=1` is set) holds the rest of a message until
/// its first part is acknowledged; Linux delays that acknowledgement by 40
/// ms or more, and it is not piggybacked, since we have nothing to send
/// until the message is whole. Each request such a peer sent would wait
/// for that timer.
pub trait PduSource: AsyncRead + Unpin {
    /// Called before a wait for more bytes that follows a read.
    fn acknowledge_now(&self) {}
}

impl PduSource for tokio::net::TcpStream {
    fn acknowledge_now(&self) {
        quickack(socket2::SockRef::from(self));
    }
}

impl PduSource for tokio::net::tcp::ReadHalf<'_> {
    fn acknowledge_now(&self) {
        quickack(socket2::SockRef::from(self.as_ref()));
    }
}

/// In-memory PDUs (tests): nothing to acknowledge.
impl PduSource for &[u8] {}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn quickack(socket: socket2::SockRef<'_>) {
    // Linux leaves quick-ACK mode again as soon as it sends data, so this
    // is set before every wait that follows a read; failure only costs the
    // delay it avoids.
    let _ = socket.set_tcp_quickack(true);
}

/// Elsewhere there is no such option (the upload tool builds there too).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn quickack(_: socket2::SockRef<'_>) {}

/// A received PDU: P-DATA-TF bodies stay raw (see [`pdvs`]).
#[derive(Debug)]
pub enum Incoming {
    PData(Bytes),
    Other(Pdu),
}

/// Cancel-safe PDU reader: partially received bytes stay in the buffer, so a
/// `select!` or `timeout` around [`PduReader::next`] loses nothing.
#[derive(Debug)]
pub struct PduReader {
    buf: BytesMut,
    max_pdata: u32,
    /// PDVs of a P-DATA-TF given back by [`PduReader::unread`].
    unread: Option<Bytes>,
    /// Bytes were read since the stream last acknowledged at once.
    unacknowledged: bool,
}

impl PduReader {
    pub fn new(max_pdata: u32) -> Self {
        PduReader {
            buf: BytesMut::with_capacity(64 * 1024),
            max_pdata,
            unread: None,
            unacknowledged: false,
        }
    }

    /// Gives back the PDVs of a P-DATA-TF that a caller did not consume
    /// (a P-DATA-TF may carry the end of one message and the start of the
    /// next, PS3.8 9.3.5): [`PduReader::next`] returns them first, as a
    /// P-DATA-TF body of their own.
    pub fn unread(&mut self, pdvs: &[Pdv]) {
        debug_assert!(self.unread.is_none(), "one P-DATA-TF given back at a time");
        if pdvs.is_empty() {
            return;
        }
        let mut body = BytesMut::with_capacity(pdvs.iter().map(|p| 6 + p.data.len()).sum());
        for p in pdvs {
            body.put_u32(2 + p.data.len() as u32);
            body.put_u8(p.context_id);
            body.put_u8(u8::from(p.is_command) | (u8::from(p.is_last) << 1));
            body.put_slice(&p.data);
        }
        self.unread = Some(body.freeze());
    }

    /// True while PDVs given back by [`PduReader::unread`] wait to be read.
    pub fn has_unread(&self) -> bool {
        self.unread.is_some()
    }

    /// Bytes of a PDU received but not yet returned (a PDU on its way).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Like [`PduReader::next`], but gives up (`None`) only after `quiet`
    /// without a byte: a timer of inactivity, not a deadline for the whole
    /// PDU, so a large PDU on a slow link is read as long as it comes.
    pub async fn next_unless_quiet<R: PduSource>(
        &mut self,
        stream: &mut R,
        quiet: std::time::Duration,
    ) -> Option<Result<Option<Incoming>, UlError>> {
        loop {
            let before = self.buf.len();
            match tokio::time::timeout(quiet, self.next(stream)).await {
                Ok(r) => return Some(r),
                // Cancel-safe: the bytes read so far stay in the buffer.
                Err(_) if self.buf.len() > before => continue,
                Err(_) => return None,
            }
        }
    }

    /// Reads the next PDU; `Ok(None)` when the peer closed between PDUs.
    pub async fn next<R: PduSource>(
        &mut self,
        stream: &mut R,
    ) -> Result<Option<Incoming>, UlError> {
        if let Some(body) = self.unread.take() {
            return Ok(Some(Incoming::PData(body)));
        }
        loop {
            if self.buf.len() >= 6 {
                let pdu_type = self.buf[0];
                let length =
                    u32::from_be_bytes([self.buf[2], self.buf[3], self.buf[4], self.buf[5]]);
                let limit = match pdu_type {
                    0x04 => self.max_pdata,
                    0x01..=0x07 => MAX_CONTROL_PDU,
                    other => return Err(UlError::UnknownPduType(other)),
                };
                if length > limit {
                    return Err(UlError::PduTooLarge {
                        pdu_type,
                        length,
                        limit,
                    });
                }
                let total = 6 + length as usize;
                if self.buf.len() >= total {
                    let mut pdu = self.buf.split_to(total).freeze();
                    return if pdu_type == 0x04 {
                        pdu.advance(6);
                        Ok(Some(Incoming::PData(pdu)))
                    } else {
                        read_pdu(&pdu[..], MAX_CONTROL_PDU, false)
                            .map_err(|e| UlError::Malformed(e.to_string()))?
                            .map(|p| Some(Incoming::Other(p)))
                            .ok_or_else(|| UlError::Malformed("incomplete PDU".into()))
                    };
                }
                // Grow only towards the checked length of this PDU.
                self.buf.reserve((total - self.buf.len()).min(256 * 1024));
            } else {
                self.buf.reserve(64 * 1024);
            }
            if self.unacknowledged {
                stream.acknowledge_now();
                self.unacknowledged = false;
            }
            let n = stream.read_buf(&mut self.buf).await?;
            self.unacknowledged = n > 0;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(UlError::UnexpectedEof)
                };
            }
        }
    }
}

/// One presentation data value of a P-DATA-TF PDU.
#[derive(Debug)]
pub struct Pdv {
    pub context_id: u8,
    pub is_command: bool,
    pub is_last: bool,
    pub data: Bytes,
}

/// Splits a P-DATA-TF body into its PDVs.
pub fn pdvs(mut body: Bytes) -> Result<Vec<Pdv>, UlError> {
    let mut out = Vec::with_capacity(1);
    while body.has_remaining() {
        if body.len() < 6 {
            return Err(UlError::Malformed("truncated PDV item".into()));
        }
        let len = body.get_u32() as usize;
        if len < 2 || len > body.len() {
            return Err(UlError::Malformed(format!(
                "PDV item length {len} out of range"
            )));
        }
        let context_id = body.get_u8();
        let header = body.get_u8();
        let data = body.split_to(len - 2);
        out.push(Pdv {
            context_id,
            is_command: header & 0x01 != 0,
            is_last: header & 0x02 != 0,
            data,
        });
    }
    if out.is_empty() {
        return Err(UlError::Malformed("P-DATA-TF without PDV items".into()));
    }
    Ok(out)
}

/// Writes one PDU encoded by dicom-ul.
pub async fn send<W: AsyncWrite + Unpin>(stream: &mut W, pdu: &Pdu) -> Result<(), UlError> {
    let mut out = Vec::with_capacity(256);
    write_pdu(&mut out, pdu).map_err(|e| UlError::Malformed(e.to_string()))?;
    stream.write_all(&out).await?;
    Ok(())
}

/// Sends an A-ABORT from the service provider.
/// Best effort, and bounded: a peer that stopped reading (its window full)
/// does not hold the caller for longer than [`ABORT_WAIT`].
pub async fn abort<W: AsyncWrite + Unpin>(stream: &mut W, reason: AbortRQServiceProviderReason) {
    let pdu = Pdu::AbortRQ {
        source: AbortRQSource::ServiceProvider(reason),
    };
    let _ = tokio::time::timeout(ABORT_WAIT, async {
        let _ = send(stream, &pdu).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// The longest an A-ABORT may take to write.
const ABORT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Writes one P-DATA-TF PDU holding one PDV.
pub async fn send_pdv<W: AsyncWrite + Unpin>(
    stream: &mut W,
    context_id: u8,
    is_command: bool,
    is_last: bool,
    data: &[u8],
) -> Result<(), UlError> {
    // Header and data in one gathered write: with TCP_NODELAY a separate
    // header would be a separate segment, and a copy costs a pass over data.
    let header = pdv_header(context_id, is_command, is_last, data.len());
    let mut slices = [IoSlice::new(&header), IoSlice::new(data)];
    write_all_vectored(stream, &mut slices).await?;
    Ok(())
}

/// The P-DATA-TF PDU header and PDV item header of one fragment.
fn pdv_header(context_id: u8, is_command: bool, is_last: bool, len: usize) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0] = 0x04;
    h[2..6].copy_from_slice(&((len + 6) as u32).to_be_bytes());
    h[6..10].copy_from_slice(&((len + 2) as u32).to_be_bytes());
    h[10] = context_id;
    h[11] = u8::from(is_command) | (u8::from(is_last) << 1);
    h
}

/// A peer that accepts no byte for this long is treated as gone: a write of
/// any size keeps making progress or fails, and never hangs its task.
pub const WRITE_STALL: std::time::Duration = std::time::Duration::from_secs(60);

/// Writes every slice, however the stream splits the writes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    stream: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !slices.is_empty() {
        let n = tokio::time::timeout(WRITE_STALL, stream.write_vectored(slices))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the peer accepted no data for {} s", WRITE_STALL.as_secs()),
                )
            })??;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// Bytes of PDUs gathered before a write.
const WRITE_BATCH: usize = 256 * 1024;
/// Slices in one gathered write (Linux allows 1,024).
const WRITE_SLICES: usize = 512;

/// Largest PDV fragment for a peer's maximum PDU length. The PDV header is
/// 6 bytes (length, context, control); fragments stay even-length (PS3.8
/// E.1) however small the limit; 0 means unlimited, where 1 MiB fragments
/// keep every PDU length well inside its 32 bits.
pub fn max_fragment(peer_max_pdu: u32) -> usize {
    if peer_max_pdu == 0 {
        1 << 20
    } else {
        ((peer_max_pdu as usize).saturating_sub(6) & !1).clamp(2, 1 << 20)
    }
}

/// One DIMSE message stream (a command or a dataset) to send.
#[derive(Debug, Clone, Copy)]
struct Message<'a> {
    context_id: u8,
    is_command: bool,
    data: &'a [u8],
}

/// Writes a DIMSE message fragment stream (command or dataset) as P-DATA-TF
/// PDUs no larger than the peer's maximum.
pub async fn send_message<W: AsyncWrite + Unpin>(
    stream: &mut W,
    context_id: u8,
    is_command: bool,
    data: &[u8],
    peer_max_pdu: u32,
) -> Result<(), UlError> {
    let message = Message {
        context_id,
        is_command,
        data,
    };
    send_messages(stream, &[message], peer_max_pdu).await
}

/// Writes a command and its dataset (a C-STORE-RQ, a C-FIND-RSP with its
/// identifier) in the same gathered writes: the command and the start of
/// the data in one system call.
pub async fn send_command_and_dataset<W: AsyncWrite + Unpin>(
    stream: &mut W,
    context_id: u8,
    command: &[u8],
    dataset: &[u8],
    peer_max_pdu: u32,
) -> Result<(), UlError> {
    let messages = [
        Message {
            context_id,
            is_command: true,
            data: command,
        },
        Message {
            context_id,
            is_command: false,
            data: dataset,
        },
    ];
    send_messages(stream, &messages, peer_max_pdu).await
}

/// Writes messages one after the other (a C-STORE-RQ and its dataset) as
/// P-DATA-TF PDUs no larger than the peer's maximum.
///
/// PDUs are gathered into writes of up to WRITE_BATCH bytes: one system call
/// for many small PDUs (DCMTK offers 16 KiB), a command together with the
/// start of its dataset, and the data written from where it lies, uncopied.
async fn send_messages<W: AsyncWrite + Unpin>(
    stream: &mut W,
    messages: &[Message<'_>],
    peer_max_pdu: u32,
) -> Result<(), UlError> {
    let max_fragment = max_fragment(peer_max_pdu);
    let mut pdus: Vec<([u8; 12], &[u8])> = Vec::new();
    for m in messages {
        if m.data.is_empty() {
            return Err(UlError::Malformed("empty DIMSE message".into()));
        }
        let mut chunks = m.data.chunks(max_fragment).peekable();
        while let Some(chunk) = chunks.next() {
            let is_last = chunks.peek().is_none();
            let header = pdv_header(m.context_id, m.is_command, is_last, chunk.len());
            pdus.push((header, chunk));
        }
    }
    let mut slices = Vec::with_capacity((2 * pdus.len()).min(WRITE_SLICES));
    let mut batched = 0;
    for (i, (header, chunk)) in pdus.iter().enumerate() {
        slices.push(IoSlice::new(header));
        slices.push(IoSlice::new(chunk));
        batched += header.len() + chunk.len();
        let is_last = i + 1 == pdus.len();
        if is_last || batched >= WRITE_BATCH || slices.len() + 2 > WRITE_SLICES {
            write_all_vectored(stream, &mut slices).await?;
            slices.clear();
            batched = 0;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_oversized_pdu_before_buffering_it() {
        let mut bytes: &[u8] = &[0x04, 0, 0xFF, 0xFF, 0xFF, 0xF0, 1, 2, 3];
        let err = PduReader::new(16_384).next(&mut bytes).await.unwrap_err();
        assert!(matches!(
            err,
            UlError::PduTooLarge {
                length: 0xFFFF_FFF0,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn send_message_fragments_within_the_peer_maximum() {
        // 600 KB against DCMTK's 16 KiB: many PDUs, written in batches.
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = Vec::new();
        send_message(&mut wire, 3, false, &data, 16_384)
            .await
            .unwrap();
        let mut r: &[u8] = &wire;
        let mut reader = PduReader::new(16_384);
        let (mut back, mut lasts, mut pdus) = (Vec::new(), 0, 0);
        while let Some(Incoming::PData(body)) = reader.next(&mut r).await.unwrap() {
            pdus += 1;
            for pdv in pdvs(body).unwrap() {
                assert_eq!(pdv.context_id, 3);
                assert!(!pdv.is_command);
                assert_eq!(pdv.data.len() % 2, 0);
                lasts += usize::from(pdv.is_last);
                back.extend_from_slice(&pdv.data);
            }
        }
        assert_eq!(back, data);
        assert_eq!(lasts, 1, "only the final fragment is marked last");
        assert_eq!(pdus, data.len().div_ceil(16_384 - 6));
    }

    /// A stream that takes at most `per_write` bytes per write, as a busy
    /// socket may, or none ever (`None`: a peer that stopped reading).
    struct Trickle {
        written: Vec<u8>,
        per_write: Option<usize>,
    }

    impl Trickle {
        fn taking(per_write: usize) -> Self {
            Trickle {
                written: Vec::new(),
                per_write: Some(per_write),
            }
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }
        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let Some(limit) = self.per_write else {
                return std::task::Poll::Pending;
            };
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(limit - n);
                self.written.extend_from_slice(&b[..take]);
                n += take;
                if n == limit {
                    break;
                }
            }
            std::task::Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_command_and_its_dataset_survive_partial_writes_in_order() {
        let command = vec![1u8; 180];
        let dataset: Vec<u8> = (0..70_000u32).map(|i| (i % 253) as u8).collect();
        let mut wire = Trickle::taking(1000);
        send_command_and_dataset(&mut wire, 5, &command, &dataset, 16_384)
            .await
            .unwrap();
        let mut r: &[u8] = &wire.written;
        let mut reader = PduReader::new(16_384);
        let mut got: Vec<(bool, bool, Vec<u8>)> = Vec::new();
        while let Some(Incoming::PData(body)) = reader.next(&mut r).await.unwrap() {
            for pdv in pdvs(body).unwrap() {
                assert_eq!(pdv.context_id, 5);
                got.push((pdv.is_command, pdv.is_last, pdv.data.to_vec()));
            }
        }
        assert_eq!(got[0], (true, true, command));
        let data: Vec<u8> = got[1..].iter().flat_map(|(_, _, d)| d.clone()).collect();
        assert_eq!(data, dataset);
        assert!(got[1..].iter().all(|(cmd, _, _)| !cmd));
        let lasts: Vec<bool> = got[1..].iter().map(|(_, last, _)| *last).collect();
        assert_eq!(lasts.iter().filter(|l| **l).count(), 1);
        assert!(lasts[lasts.len() - 1]);

        let mut one = Trickle::taking(1000);
        send_pdv(&mut one, 9, false, true, &dataset[..5000])
            .await
            .unwrap();
        assert_eq!(one.written[..12], pdv_header(9, false, true, 5000));
        assert_eq!(one.written[12..], dataset[..5000]);
    }

    #[test]
    fn fragments_are_even_and_bounded_for_any_peer_maximum() {
        assert_eq!(max_fragment(16_384), 16_378);
        assert_eq!(
            max_fragment(16_385),
            16_378,
            "odd limits give even fragments"
        );
        assert_eq!(max_fragment(3), 2, "no underflow below the PDV header");
        assert_eq!(
            max_fragment(0),
            1 << 20,
            "unlimited stays inside 32-bit lengths"
        );
        assert_eq!(max_fragment(u32::MAX), 1 << 20);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_times_out_instead_of_hanging() {
        let mut stuck = Trickle {
            written: Vec::new(),
            per_write: None,
        };
        let started = tokio::time::Instant::now();
        let err = send_message(&mut stuck, 1, false, &[0u8; 1000], 16_384)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, UlError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut),
            "{err:?}"
        );
        assert_eq!(started.elapsed(), WRITE_STALL);
    }

    #[tokio::test]
    async fn send_message_to_a_peer_without_a_limit_is_one_pdu() {
        // Max PDU 0 means unlimited (PS3.8 D.1): one PDU, no overflow.
        let data = vec![7u8; 300_000];
        let mut wire = Vec::new();
        send_message(&mut wire, 1, true, &data, 0).await.unwrap();
        let mut r: &[u8] = &wire;
        let Some(Incoming::PData(body)) = PduReader::new(1 << 20).next(&mut r).await.unwrap()
        else {
            panic!("expected P-DATA")
        };
        let pdvs = pdvs(body).unwrap();
        assert_eq!(pdvs.len(), 1);
        assert!(pdvs[0].is_command && pdvs[0].is_last && pdvs[0].data[..] == data[..]);
        assert!(r.is_empty());
    }

    #[tokio::test]
    async fn refuses_unknown_pdu_type() {
        let mut bytes: &[u8] = &[0x42, 0, 0, 0, 0, 0];
        let err = PduReader::new(16_384).next(&mut bytes).await.unwrap_err();
        assert!(matches!(err, UlError::UnknownPduType(0x42)));
    }

    #[tokio::test]
    async fn splits_pdata_and_reports_eof_mid_pdu() {
        let mut pdu = vec![0x04, 0, 0, 0, 0, 14];
        pdu.extend_from_slice(&[0, 0, 0, 4, 1, 0x03, 0xAA, 0xBB]);
        pdu.extend_from_slice(&[0, 0, 0, 2, 3, 0x00]);
        let mut r: &[u8] = &pdu;
        let mut reader = PduReader::new(16_384);
        let Some(Incoming::PData(body)) = reader.next(&mut r).await.unwrap() else {
            panic!("expected P-DATA")
        };
        let pdvs = pdvs(body).unwrap();
        assert_eq!(pdvs.len(), 2);
        assert!(pdvs[0].is_command && pdvs[0].is_last && pdvs[0].data[..] == [0xAA, 0xBB]);
        assert!(!pdvs[1].is_command && pdvs[1].data.is_empty());
        assert!(reader.next(&mut r).await.unwrap().is_none());
        let mut partial: &[u8] = &pdu[..10];
        assert!(matches!(
            PduReader::new(16_384).next(&mut partial).await,
            Err(UlError::UnexpectedEof)
        ));
    }

    #[tokio::test]
    async fn pdvs_given_back_are_read_first_as_they_were() {
        let mut pdu = vec![0x04, 0, 0, 0, 0, 22];
        pdu.extend_from_slice(&[0, 0, 0, 4, 1, 0x03, 0xAA, 0xBB]);
        pdu.extend_from_slice(&[0, 0, 0, 3, 1, 0x01, 0xCC]);
        pdu.extend_from_slice(&[0, 0, 0, 3, 3, 0x02, 0xDD]);
        let mut next = vec![0x04, 0, 0, 0, 0, 7, 0, 0, 0, 3, 5, 0x03, 0xEE];
        pdu.append(&mut next);
        let mut r: &[u8] = &pdu;
        let mut reader = PduReader::new(16_384);
        let Some(Incoming::PData(body)) = reader.next(&mut r).await.unwrap() else {
            panic!("expected P-DATA")
        };
        let first = pdvs(body).unwrap();
        reader.unread(&first[1..]);
        let Some(Incoming::PData(body)) = reader.next(&mut r).await.unwrap() else {
            panic!("expected the PDVs given back")
        };
        let rest = pdvs(body).unwrap();
        assert_eq!(rest.len(), 2);
        assert!(rest[0].context_id == 1 && rest[0].is_command && !rest[0].is_last);
        assert_eq!(rest[0].data[..], [0xCC]);
        assert!(rest[1].context_id == 3 && !rest[1].is_command && rest[1].is_last);
        assert_eq!(rest[1].data[..], [0xDD]);
        // Nothing given back: the stream's next PDU comes next.
        reader.unread(&[]);
        let Some(Incoming::PData(body)) = reader.next(&mut r).await.unwrap() else {
            panic!("expected the next PDU")
        };
        assert_eq!(pdvs(body).unwrap()[0].data[..], [0xEE]);
        assert!(reader.next(&mut r).await.unwrap().is_none());
    }
}
