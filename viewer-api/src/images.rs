//! Serving pixels: rendered frames through a bounded cache, decoding and
//! encoding on blocking threads (at most one per core at a time), whole
//! series as a stream, and raw instances in chunks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use consortium_proto::v1::{ImageFormat, RawChunk, RenderOptions, RenderedFrame, Window};
use futures::StreamExt;
use tokio::sync::{Semaphore, mpsc};

use crate::error::{ApiError, Result};
pub use crate::render::Spec;
use crate::render::{self, Format, Frame, RenderError, Rendered, Voi};
use crate::studies::{self, InstanceRow, open_object};

/// Largest raw chunk sent in one message (well under gRPC's 4 MiB default).
pub const RAW_CHUNK: usize = 1 << 20;

impl From<RenderError> for ApiError {
    fn from(e: RenderError) -> Self {
        match e {
            RenderError::UnsupportedSyntax(_) => ApiError::Unimplemented(e.to_string()),
            RenderError::FrameOutOfRange { .. } => ApiError::InvalidArgument(e.to_string()),
            other => ApiError::FailedPrecondition(other.to_string()),
        }
    }
}

/// Turns the request's options into a render spec for frame index `frame`.
pub fn spec_from(options: Option<&RenderOptions>, frame: u32) -> Result<Spec> {
    let o = options.cloned().unwrap_or_default();
    let format = match ImageFormat::try_from(o.format) {
        Ok(ImageFormat::Unspecified | ImageFormat::Png) => Format::Png,
        Ok(ImageFormat::Jpeg) => Format::Jpeg {
            quality: if o.jpeg_quality == 0 {
                90
            } else {
                o.jpeg_quality.clamp(1, 100) as u8
            },
        },
        Err(_) => return Err(ApiError::InvalidArgument("unknown image format".into())),
    };
    let voi = match (&o.window, o.preset.as_str()) {
        (Some(w), _) => {
            if !(w.width.is_finite() && w.center.is_finite()) || w.width < 1.0 {
                return Err(ApiError::InvalidArgument(
                    "a window has a finite center and a width of at least 1".into(),
                ));
            }
            Voi::Window {
                center: w.center,
                width: w.width,
            }
        }
        (None, "") => Voi::Default,
        (None, name) => {
            let &(name, center, width) = render::PRESETS
                .iter()
                .find(|(n, _, _)| n.eq_ignore_ascii_case(name))
                .ok_or_else(|| {
                    let names: Vec<&str> = render::PRESETS.iter().map(|p| p.0).collect();
                    ApiError::InvalidArgument(format!(
                        "unknown preset; known presets: {}",
                        names.join(", ")
                    ))
                })?;
            Voi::Preset {
                name,
                center,
                width,
            }
        }
    };
    let bound = |v: u32| v.min(8192);
    Ok(Spec {
        frame,
        voi,
        format,
        max_width: bound(o.max_width),
        max_height: bound(o.max_height),
    })
}

pub fn to_proto(sop_uid: &str, spec: &Spec, r: &Rendered) -> RenderedFrame {
    RenderedFrame {
        sop_instance_uid: sop_uid.to_string(),
        frame_number: spec.frame + 1,
        format: match spec.format {
            Format::Png => ImageFormat::Png as i32,
            Format::Jpeg { .. } => ImageFormat::Jpeg as i32,
        },
        data: r.data.clone(),
        width: r.width,
        height: r.height,
        window: r.window.map(|(center, width)| Window { center, width }),
    }
}

/// What a cache entry weighs against its budget.
trait Weight {
    fn weight(&self) -> usize;
}

impl Weight for Rendered {
    fn weight(&self) -> usize {
        self.data.len()
    }
}

impl Weight for Frame {
    fn weight(&self) -> usize {
        self.bytes()
    }
}

/// What an entry costs beside its value: its key, the map and order
/// entries. Counted so that a flood of tiny renders (a new window per
/// request, 1x1 pixel) cannot hold millions of entries within the budget.
const ENTRY_OVERHEAD: usize = 256;

/// Least recently used entries evicted past a byte budget; each access
/// and eviction is O(log n) under the cache's lock.
struct Cache<T> {
    budget: usize,
    used: usize,
    tick: u64,
    entries: HashMap<String, (Arc<T>, u64)>,
    /// Last use -> key, oldest first.
    order: std::collections::BTreeMap<u64, String>,
}

impl<T: Weight> Cache<T> {
    fn new(budget: usize) -> Cache<T> {
        Cache {
            budget,
            used: 0,
            tick: 0,
            entries: HashMap::new(),
            order: std::collections::BTreeMap::new(),
        }
    }

    fn cost(key: &str, value: &T) -> usize {
        value.weight() + key.len() + ENTRY_OVERHEAD
    }

    fn get(&mut self, key: &str) -> Option<Arc<T>> {
        self.tick += 1;
        let tick = self.tick;
        let (value, last) = self.entries.get_mut(key)?;
        if let Some(k) = self.order.remove(last) {
            self.order.insert(tick, k);
        }
        *last = tick;
        Some(value.clone())
    }

    fn put(&mut self, key: String, value: Arc<T>) {
        let size = Self::cost(&key, &value);
        if size > self.budget / 4 {
            return;
        }
        self.tick += 1;
        self.order.insert(self.tick, key.clone());
        if let Some((old, last)) = self.entries.insert(key.clone(), (value, self.tick)) {
            self.order.remove(&last);
            self.used -= Self::cost(&key, &old);
        }
        self.used += size;
        while self.used > self.budget {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some((r, _)) = self.entries.remove(&oldest) {
                self.used -= Self::cost(&oldest, &r);
            }
        }
    }
}

pub struct Images {
    blobs: storage::BlobStore,
    /// Encoded frames, for repeated identical requests.
    cache: Mutex<Cache<Rendered>>,
    /// Decoded frames, so a new window, size or format skips the decode.
    frames: Mutex<Cache<Frame>>,
    /// One decode/encode per core at a time; the rest wait their turn.
    workers: Arc<Semaphore>,
    /// Instances held open (pixel data included) by series streams at once,
    /// across all callers: what bounds their memory.
    streaming: Arc<Semaphore>,
}

/// A series stream whose client takes no frame for this long is ended, so
/// that it does not hold an open instance (and a `streaming` permit).
const STREAM_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a series stream keeps its instance open (and its `streaming`
/// turn) while its client takes no frame; then, if every turn is taken,
/// both are given back, and the instance is opened again when the client
/// reads on.
const KEEP_OPEN_FOR_A_SLOW_READER: std::time::Duration = std::time::Duration::from_secs(1);

impl Images {
    pub fn new(blobs: storage::BlobStore, cache_bytes: usize, frame_cache_bytes: usize) -> Images {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Images {
            blobs,
            cache: Mutex::new(Cache::new(cache_bytes)),
            frames: Mutex::new(Cache::new(frame_cache_bytes)),
            workers: Arc::new(Semaphore::new(cores)),
            streaming: Arc::new(Semaphore::new(2 * cores)),
        }
    }

    /// Where the instances are read from.
    pub fn blobs(&self) -> &storage::BlobStore {
        &self.blobs
    }

    fn cache_key(instance: &InstanceRow, spec: &Spec) -> String {
        format!("{}/{:?}", instance.sha256, spec)
    }

    fn frame_key(instance: &InstanceRow, frame: u32) -> String {
        format!("{}/{frame}", instance.sha256)
    }

    /// A decoded frame from the cache, after `load` decoded it if needed.
    fn decoded(
        &self,
        instance: &InstanceRow,
        frame: u32,
        load: impl FnOnce() -> Result<Frame>,
    ) -> Result<Arc<Frame>> {
        let key = Images::frame_key(instance, frame);
        if let Some(hit) = self.frames.lock().expect("frame cache lock").get(&key) {
            return Ok(hit);
        }
        let decoded = Arc::new(load()?);
        self.frames
            .lock()
            .expect("frame cache lock")
            .put(key, decoded.clone());
        Ok(decoded)
    }

    /// Where a blob can be read: a local path, or its bytes.
    pub async fn source(
        &self,
        key: &str,
    ) -> Result<(Option<std::path::PathBuf>, Option<bytes::Bytes>)> {
        match self.blobs.local_path(key) {
            Some(p) => Ok((Some(p), None)),
            None => Ok((None, Some(self.blobs.get(key).await?))),
        }
    }

    /// One stored instance's DICOM JSON, without its pixel data. Parsed
    /// during a render worker's turn: a flood of metadata calls takes the
    /// CPU a render would, and waits like one (a fetch from a bucket does
    /// not hold a turn). From a bucket only the blob's first
    /// [`HEADER_PREFIX`] bytes are fetched (a header is a few KiB, the
    /// pixel data most of the blob); the whole blob only when the header
    /// goes on past them.
    pub async fn header_json(&self, key: &str, size: u64) -> Result<String> {
        if let Some(path) = self.blobs.local_path(key) {
            return self
                .parse(move || {
                    studies::dataset_json(&studies::open_object(Some(path), None, true)?)
                })
                .await;
        }
        if size > HEADER_PREFIX {
            let head = self.blobs.get_prefix(key, HEADER_PREFIX).await?;
            let json = self
                .parse(move || {
                    studies::open_header_prefix(&head)
                        .map(|obj| studies::dataset_json(&obj))
                        .transpose()
                })
                .await?;
            if let Some(json) = json {
                return Ok(json);
            }
        }
        let whole = self.blobs.get(key).await?;
        self.parse(move || studies::dataset_json(&studies::open_object(None, Some(whole), true)?))
            .await
    }

    /// `parse` on a blocking thread, during a render worker's turn. The
    /// turn moves into the task: a caller that leaves does not give it
    /// back while the parse still runs.
    async fn parse<T: Send + 'static>(
        &self,
        parse: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let turn = self.worker().await?;
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            parse()
        })
        .await
        .map_err(|e| ApiError::Internal(format!("parse task: {e}")))?
    }

    /// A frame rendered before, from the cache.
    pub fn cached(&self, instance: &InstanceRow, spec: &Spec) -> Option<Arc<Rendered>> {
        let key = Images::cache_key(instance, spec);
        self.cache.lock().expect("cache lock").get(&key)
    }

    /// A render worker's turn, waited for on no thread: renders run on the
    /// blocking threads that every caller's index reads and audit writes
    /// share, and a turn waited for there would hold one each.
    pub async fn worker(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        self.workers
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::Internal("render workers closed".into()))
    }

    /// One rendered frame, from the cache when it was rendered before (by
    /// another call meanwhile), else rendered during `_turn` (from
    /// [`Images::worker`]); on a blocking thread, `handle` runs the read of
    /// a remote blob.
    pub fn render_blocking(
        &self,
        instance: &InstanceRow,
        spec: &Spec,
        handle: &tokio::runtime::Handle,
        _turn: &tokio::sync::OwnedSemaphorePermit,
    ) -> Result<Arc<Rendered>> {
        if let Some(hit) = self.cached(instance, spec) {
            return Ok(hit);
        }
        let key = Images::cache_key(instance, spec);
        let started = std::time::Instant::now();
        let frame = self.decoded(instance, spec.frame, || {
            let (path, bytes) = handle.block_on(self.source(&instance.blob_key))?;
            let obj = open_object(path, bytes, false)?;
            Ok(render::decode(&obj, spec.frame)?)
        })?;
        let decoded = started.elapsed();
        let rendered = Arc::new(render::display(&frame, spec)?);
        tracing::debug!(
            decode_us = decoded.as_micros() as u64,
            display_us = (started.elapsed() - decoded).as_micros() as u64,
            "rendered"
        );
        self.cache
            .lock()
            .expect("cache lock")
            .put(key, rendered.clone());
        Ok(rendered)
    }

    /// Renders every frame of `instances` in order into `tx`: an async task
    /// that takes a blocking thread only to open an instance or render one
    /// frame, so a client that stops reading holds no thread. Stops when the
    /// receiver goes away or a frame fails (the error is the last message).
    /// `hold` (the caller's stream slot) is kept until the task ends.
    pub fn stream_series<H: Send + 'static>(
        self: &Arc<Self>,
        instances: Vec<InstanceRow>,
        template: Spec,
        tx: mpsc::Sender<std::result::Result<RenderedFrame, tonic::Status>>,
        hold: H,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            let _hold = hold;
            for instance in instances {
                if let Err(e) = me.stream_instance(&instance, &template, &tx).await {
                    // Without waiting: a client that stopped reading has a
                    // full channel, and this task must end all the same.
                    let _ = tx.try_send(Err(e.into()));
                    return;
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
    }

    async fn stream_instance(
        self: &Arc<Self>,
        instance: &InstanceRow,
        template: &Spec,
        tx: &mpsc::Sender<std::result::Result<RenderedFrame, tonic::Status>>,
    ) -> Result<()> {
        // The instance, open, with its `streaming` turn: opened for the first
        // frame not in the cache, given back while the client does not read.
        let mut open: Option<(
            tokio::sync::OwnedSemaphorePermit,
            Arc<dicom_object::DefaultDicomObject>,
        )> = None;
        for frame in 0..instance.number_of_frames {
            // Room for the frame first. A client that does not read keeps
            // the instance open for `KEEP_OPEN_FOR_A_SLOW_READER` at most
            // while every turn is taken, not the whole send timeout: one
            // user's stalled streams must not hold every turn while other
            // readers wait for one.
            let room = match tokio::time::timeout(KEEP_OPEN_FOR_A_SLOW_READER, tx.reserve()).await {
                Ok(room) => room,
                Err(_) => {
                    // Given back when every turn is taken (others may wait
                    // for one); a slow reader alone keeps its instance open
                    // rather than have it read again for each frame.
                    if self.streaming.available_permits() == 0 {
                        open = None;
                    }
                    match tokio::time::timeout(STREAM_SEND_TIMEOUT, tx.reserve()).await {
                        Ok(room) => room,
                        Err(_) => {
                            return Err(ApiError::DeadlineExceeded(
                                "the client stopped reading the series stream".into(),
                            ));
                        }
                    }
                }
            };
            let Ok(room) = room else {
                return Ok(()); // the client went away
            };
            let spec = Spec {
                frame,
                ..template.clone()
            };
            let key = Images::cache_key(instance, &spec);
            let cached = self.cache.lock().expect("cache lock").get(&key);
            let rendered = match cached {
                Some(r) => r,
                None => {
                    let obj = match &open {
                        Some((_, obj)) => obj.clone(),
                        None => {
                            // A client gone while this waits for its turn takes no turn.
                            let turn = tokio::select! {
                                permit = self.streaming.clone().acquire_owned() => permit
                                    .map_err(|_| ApiError::Internal("series streams closed".into()))?,
                                () = tx.closed() => return Ok(()),
                            };
                            let (path, bytes) = self.source(&instance.blob_key).await?;
                            let obj = Arc::new(
                                tokio::task::spawn_blocking(move || {
                                    open_object(path, bytes, false)
                                })
                                .await??,
                            );
                            open = Some((turn, obj.clone()));
                            obj
                        }
                    };
                    let _permit = self
                        .workers
                        .acquire()
                        .await
                        .map_err(|_| ApiError::Internal("render workers closed".into()))?;
                    let (me, row, s) = (self.clone(), instance.clone(), spec.clone());
                    // Decoded frames are kept: the reader scrolls back.
                    let r = tokio::task::spawn_blocking(move || -> Result<Arc<Rendered>> {
                        let f = me.decoded(&row, frame, || Ok(render::decode(&obj, frame)?))?;
                        Ok(Arc::new(render::display(&f, &s)?))
                    })
                    .await??;
                    self.cache.lock().expect("cache lock").put(key, r.clone());
                    r
                }
            };
            room.send(Ok(to_proto(&instance.sop_instance_uid, &spec, &rendered)));
        }
        Ok(())
    }

    /// Streams the stored file in chunks of at most [`RAW_CHUNK`] bytes.
    pub async fn stream_raw(
        &self,
        instance: InstanceRow,
        tx: mpsc::Sender<std::result::Result<RawChunk, tonic::Status>>,
    ) -> Result<()> {
        let mut stream = self.blobs.get_stream(&instance.blob_key).await?;
        let mut offset = 0u64;
        let mut pending = bytes::BytesMut::new();
        let mut first = true;
        loop {
            let next = stream.next().await.transpose()?;
            if let Some(bytes) = &next {
                pending.extend_from_slice(bytes);
            }
            while pending.len() >= RAW_CHUNK || (next.is_none() && (!pending.is_empty() || first)) {
                let take = pending.len().min(RAW_CHUNK);
                let data = pending.split_to(take).freeze();
                let mut chunk = RawChunk {
                    offset,
                    data,
                    ..RawChunk::default()
                };
                if first {
                    chunk.total_size = instance.size;
                    chunk.sha256 = instance.sha256.clone();
                    chunk.transfer_syntax_uid = instance.transfer_syntax.clone();
                    first = false;
                }
                offset += take as u64;
                if tx.send(Ok(chunk)).await.is_err() {
                    return Ok(());
                }
            }
            if next.is_none() {
                return Ok(());
            }
        }
    }
}

/// Bytes of a bucket's blob fetched for its header (see [`Images::header_json`]).
const HEADER_PREFIX: u64 = 64 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(bytes: usize) -> Arc<Rendered> {
        Arc::new(Rendered {
            data: vec![0; bytes].into(),
            width: 1,
            height: 1,
            window: None,
        })
    }

    #[test]
    fn the_cache_keeps_recent_frames_within_its_budget() {
        // Each entry costs its 200 bytes, its 1-byte key and the overhead.
        let cost = 200 + 1 + ENTRY_OVERHEAD;
        let mut cache = Cache::new(4 * cost);
        cache.put("a".into(), frame(200));
        cache.put("b".into(), frame(200));
        cache.put("c".into(), frame(200));
        assert!(cache.get("a").is_some()); // a is now the most recent
        cache.put("d".into(), frame(200)); // exactly the budget: still fits
        cache.put("e".into(), frame(200)); // evicts the least recent: b
        assert!(cache.get("b").is_none());
        assert!(cache.get("a").is_some());
        assert!(cache.used <= 4 * cost);
        // Larger than a quarter of the budget: not cached at all.
        cache.put("huge".into(), frame(300));
        assert!(cache.get("huge").is_none());
        // A zero budget caches nothing.
        let mut off: Cache<Rendered> = Cache::new(0);
        off.put("a".into(), frame(1));
        assert!(off.get("a").is_none());
    }

    #[test]
    fn a_flood_of_tiny_entries_stays_bounded() {
        let budget = 64 << 10;
        let mut cache = Cache::new(budget);
        for i in 0..10_000 {
            cache.put(format!("sha/window {i}"), frame(1));
        }
        assert!(cache.used <= budget);
        assert!(
            cache.entries.len() <= budget / ENTRY_OVERHEAD,
            "{}",
            cache.entries.len()
        );
        assert_eq!(cache.order.len(), cache.entries.len());
        // The newest are the ones kept.
        assert!(cache.get("sha/window 9999").is_some());
        assert!(cache.get("sha/window 0").is_none());
    }
}
