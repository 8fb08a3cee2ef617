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
use crate::studies::{InstanceRow, open_object};

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

/// Least recently used entries evicted past a byte budget.
struct Cache<T> {
    budget: usize,
    used: usize,
    tick: u64,
    entries: HashMap<String, (Arc<T>, u64)>,
}

impl<T: Weight> Cache<T> {
    fn new(budget: usize) -> Cache<T> {
        Cache {
            budget,
            used: 0,
            tick: 0,
            entries: HashMap::new(),
        }
    }

    fn get(&mut self, key: &str) -> Option<Arc<T>> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(key).map(|(r, t)| {
            *t = tick;
            r.clone()
        })
    }

    fn put(&mut self, key: String, value: Arc<T>) {
        let size = value.weight();
        if size > self.budget / 4 {
            return;
        }
        self.tick += 1;
        if let Some((old, _)) = self.entries.insert(key, (value, self.tick)) {
            self.used -= old.weight();
        }
        self.used += size;
        while self.used > self.budget {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((r, _)) = self.entries.remove(&oldest) {
                self.used -= r.weight();
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
}

impl Images {
    pub fn new(blobs: storage::BlobStore, cache_bytes: usize, frame_cache_bytes: usize) -> Images {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Images {
            blobs,
            cache: Mutex::new(Cache::new(cache_bytes)),
            frames: Mutex::new(Cache::new(frame_cache_bytes)),
            workers: Arc::new(Semaphore::new(cores)),
        }
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

    /// One rendered frame, from the cache when it was rendered before; runs
    /// on a blocking thread, `handle` runs the waits (a worker permit, a
    /// remote blob).
    pub fn render_blocking(
        &self,
        instance: &InstanceRow,
        spec: &Spec,
        handle: &tokio::runtime::Handle,
    ) -> Result<Arc<Rendered>> {
        let key = Images::cache_key(instance, spec);
        if let Some(hit) = self.cache.lock().expect("cache lock").get(&key) {
            return Ok(hit);
        }
        let _permit = handle
            .block_on(self.workers.acquire())
            .map_err(|_| ApiError::Internal("render workers closed".into()))?;
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
    pub fn stream_series(
        self: &Arc<Self>,
        instances: Vec<InstanceRow>,
        template: Spec,
        tx: mpsc::Sender<std::result::Result<RenderedFrame, tonic::Status>>,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            for instance in instances {
                if let Err(e) = me.stream_instance(&instance, &template, &tx).await {
                    let _ = tx.send(Err(e.into())).await;
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
        let (path, bytes) = self.source(&instance.blob_key).await?;
        let obj =
            Arc::new(tokio::task::spawn_blocking(move || open_object(path, bytes, false)).await??);
        for frame in 0..render::number_of_frames(&obj) {
            let spec = Spec {
                frame,
                ..template.clone()
            };
            let key = Images::cache_key(instance, &spec);
            let cached = self.cache.lock().expect("cache lock").get(&key);
            let rendered = match cached {
                Some(r) => r,
                None => {
                    let _permit = self
                        .workers
                        .acquire()
                        .await
                        .map_err(|_| ApiError::Internal("render workers closed".into()))?;
                    let (me, obj, row, s) =
                        (self.clone(), obj.clone(), instance.clone(), spec.clone());
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
            let msg = to_proto(&instance.sop_instance_uid, &spec, &rendered);
            if tx.send(Ok(msg)).await.is_err() {
                return Ok(());
            }
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
        let mut cache = Cache::new(1000);
        cache.put("a".into(), frame(200));
        cache.put("b".into(), frame(200));
        cache.put("c".into(), frame(200));
        assert!(cache.get("a").is_some()); // a is now the most recent
        cache.put("d".into(), frame(200));
        cache.put("e".into(), frame(200)); // 1000 bytes: still fits
        cache.put("f".into(), frame(200)); // evicts the least recent: b
        assert!(cache.get("b").is_none());
        assert!(cache.get("a").is_some());
        assert!(cache.used <= 1000);
        // Larger than a quarter of the budget: not cached at all.
        cache.put("huge".into(), frame(300));
        assert!(cache.get("huge").is_none());
        // A zero budget caches nothing.
        let mut off: Cache<Rendered> = Cache::new(0);
        off.put("a".into(), frame(1));
        assert!(off.get("a").is_none());
    }
}
